"""privlora's ClientApp, then one corruption of the reply per round for a site whose
node-config has ``fault``: what a broken or malicious site could send the server."""

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from privlora.flower import client_app as honest

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
    arrays = reply.content["update"]
    name = min(arrays.keys())
    x = arrays[name].numpy().copy()
    if kind == "shape":
        arrays[name] = Array.from_numpy_ndarray(x[:-1])
    elif kind in ("nan", "inf"):
        x.flat[0] = np.nan if kind == "nan" else np.inf
        arrays[name] = Array.from_numpy_ndarray(x)
    elif kind == "extra":
        arrays["base_model.extra.lora_B"] = Array.from_numpy_ndarray(x)
    elif kind == "missing":
        del arrays[name]
    elif kind == "norm":
        arrays[name] = Array.from_numpy_ndarray(x * 1e6)
    elif kind == "dtype":
        arrays[name] = Array.from_numpy_ndarray(x.astype(np.float64))
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return reply
