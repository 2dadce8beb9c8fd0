"""privlora's ClientApp, then one corruption of the reply per round for a site whose
node-config has ``fault``: what a broken or malicious site could send the server."""

import math

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from privlora.flower import client_app as honest
from privlora.flower import wire
from privlora.protocol import Payload

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return honest.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    faults = str(context.node_config.get("fault", ""))
    if not faults:
        return reply
    kind = faults.split(",")[int(msg.content["run"]["round"]) - 1]
    update = wire.from_record(reply.content["update"], str(reply.content["meta"]["meta"]))
    tensors = dict(update.tensors)
    name = min(tensors)
    x = tensors[name].clone()
    if kind == "shape":
        tensors[name] = x[:-1]
    elif kind in ("nan", "inf"):
        x.view(-1)[0] = math.nan if kind == "nan" else math.inf
        tensors[name] = x
    elif kind == "extra":
        tensors["base_model.extra.lora_B"] = x
    elif kind == "missing":
        del tensors[name]
    elif kind == "norm":
        tensors[name] = x * 1e6
    elif kind == "dtype":
        tensors[name] = x.to(torch.float64)
    else:
        raise ValueError(f"unknown fault {kind!r}")
    arrays, text = wire.to_record(Payload(tensors, update.meta))
    reply.content["update"] = arrays
    reply.content["meta"] = ConfigRecord({"meta": text})
    return reply
