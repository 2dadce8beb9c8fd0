"""``privlora flower local``: a whole federation on 127.0.0.1, for trying the deployment runtime
on one machine and for the tests. One SuperLink and N SuperNodes on free ports (never Flower's
defaults), the privlora app submitted with ``flwr run``, progress from the run directory, and
every process it started stopped by PID (with its process group) on success, failure or Ctrl-C.

With ``secure`` the federation runs as across real machines: TLS with a CA made for the run,
and SuperNode authentication (each node's public key registered with ``flwr supernode
register`` before it starts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from privlora import data, server
from privlora.config import RunConfig, to_toml
from privlora.flower import app_dir, certs
from privlora.privacy import recipe
from privlora.privacy.plan import make_plan
from privlora.run_dir import check_target

FLOWER_DEFAULT_PORTS = frozenset({8000, 8080, 9091, 9092, 9093, 9094, 9095, 9096})
CONNECTION = "privlora-local"
STATUS_EVERY = 10.0  # seconds between `flwr ls` calls while a run goes on


class DeploymentFailed(RuntimeError):
    """The Flower run failed or a daemon did not start; the message says where to look."""


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free TCP ports on 127.0.0.1 (none of Flower's defaults)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            if s.getsockname()[1] not in FLOWER_DEFAULT_PORTS:
                ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def flower_env(home: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of every Flower process: this interpreter's bin first on PATH (the
    daemons start flwr-serverapp / flwr-clientapp by name), its own FLWR_HOME, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    # a SuperExec looks for a task to start (a ServerApp, a ClientApp) every second by default
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass
class Processes:
    """The daemons this run started: each in its own process group, stopped by PID."""

    started: list[subprocess.Popen] = field(default_factory=list)

    def start(self, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with log.open("ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM each process group and every descendant (Flower starts its SuperExec in a
        session of its own), SIGKILL what is left after ``grace`` seconds."""
        family = [pid for proc in self.started for pid in descendants(proc.pid)]
        for proc in self.started:
            _signal_group(proc, signal.SIGTERM)
        _signal_each(family, signal.SIGTERM)
        deadline = time.time() + grace
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # children of an exited daemon too
            proc.wait()
        _signal_each(family, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Return the PIDs of every process below ``pid`` (from /proc; [] where there is none)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _signal_each(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LocalFederation:
    """A SuperLink and its SuperNodes on 127.0.0.1, and the ``flwr`` CLI pointed at it."""

    work: Path
    clients: int
    secure: bool = False
    processes: Processes = field(default_factory=Processes)
    link_port: int = 0
    sites: list[list[subprocess.Popen]] = field(default_factory=list)  # [SuperNode, worker]

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def start(self, sites: list[dict[str, object]]) -> None:
        """Start the SuperLink, register the nodes' keys when secure, start one SuperNode per
        site (``sites[k]`` is its node-config), and return once the SuperLink answers."""
        self.logs.mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + len(sites))
        self.link_port = ports[0]
        link = [_tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(ports[0]),
                "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                "--database", str(self.work / "superlink.db")]
        tls = certs.server_certs(self.work / "certs") if self.secure else None
        if tls is None:
            link.append("--insecure")
        else:
            link += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
                     "--ssl-keyfile", str(tls.key), "--enable-supernode-auth"]
        self._write_cli_config(tls)
        self.processes.start(link, self.logs / "superlink.log",
                             flower_env(self.work / "home-superlink"))
        self._wait_for_port(ports[0])
        threads = max(1, (os.cpu_count() or 1) // len(sites))
        nodes: list[tuple[int, dict[str, str], subprocess.Popen]] = []
        for k, (site, port) in enumerate(zip(sites, ports[1:])):
            node = [_tool("flower-supernode"), "--superlink", f"127.0.0.1:{ports[0]}",
                    "--host", "127.0.0.1", "--port", str(port), "--isolation", "process",
                    "--node-config", node_config(site)]
            if tls is None:
                node.append("--insecure")
            else:
                key, public = certs.node_keys(self.work / "certs", f"node{k}")
                self.flwr("supernode", "register", str(public), CONNECTION)
                node += ["--root-certificates", str(tls.ca), "--auth-supernode-private-key",
                         str(key)]
            env = flower_env(self.work / f"home-node{k}", threads)
            nodes.append((port, env, self.processes.start(node, self.logs / f"supernode-{k}.log",
                                                          env)))
        # each site's ClientApps, from one warm process (flower/worker.py) instead of Flower's
        # SuperExec starting a fresh interpreter per message; its SuperNode's Runtime API is local
        for k, (port, env, supernode) in enumerate(nodes):
            self._wait_for_port(port)
            worker = self.processes.start(
                [sys.executable, "-m", "privlora", "flower", "worker",
                 "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"],
                self.logs / f"worker-{k}.log", env)
            self.sites.append([supernode, worker])

    def _write_cli_config(self, tls: certs.ServerCerts | None) -> None:
        home = self.work / "home-cli"
        home.mkdir(parents=True, exist_ok=True)
        lines = [f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{self.link_port}"']
        lines.append("insecure = true" if tls is None else f"root-certificates = "
                     f"{json.dumps(str(tls.ca))}")
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def _wait_for_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.processes.started):
                raise DeploymentFailed(f"a Flower daemon exited at start; see {self.logs}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentFailed(f"nothing listened on 127.0.0.1:{port} within "
                               f"{timeout:.0f} s; see {self.logs}")

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this federation; return its stdout."""
        done = subprocess.run([_tool("flwr"), *args], check=False, capture_output=True, text=True,
                              env=flower_env(self.work / "home-cli"), timeout=timeout)
        if done.returncode != 0:
            raise DeploymentFailed(f"flwr {' '.join(args[:2])} failed ({done.returncode}): "
                                   f"{(done.stdout + done.stderr).strip()[-800:]}")
        return done.stdout

    def submit(self, app: Path, config_path: Path, out: Path, overwrite: bool,
               resume: bool = False) -> int:
        """Submit the Flower App in directory ``app``; return the run id."""
        settings = (f"config={json.dumps(str(config_path))} out={json.dumps(str(out))} "
                    f"overwrite={'true' if overwrite else 'false'} "
                    f"resume={'true' if resume else 'false'}")
        reply = json.loads(self.flwr("run", str(app), CONNECTION, "--run-config", settings,
                                     "--format", "json"))
        if not reply.get("success", True) or "run-id" not in reply:
            raise DeploymentFailed(f"flwr run did not start the app: {reply}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        """Return the run's status as ``flwr ls`` gives it (e.g. 'running', 'finished:failed')."""
        reply = json.loads(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format",
                                     "json"))
        runs = reply.get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def server_log(self, run_id: int) -> str:
        try:
            return self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60)
        except (DeploymentFailed, subprocess.TimeoutExpired) as err:
            return f"(no log: {err})"


def node_config(site: dict[str, object]) -> str:
    """Render a site's settings as --node-config (TOML values: strings quoted, true/false)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str | bool) else v}"
                    for k, v in site.items())


def write_sites(config: RunConfig, folder: Path) -> list[dict[str, object]]:
    """Split the config's data exactly as the simulation does and write each site's rows to its
    own JSONL (owner-only); return each site's node-config. Checks the plan with the real
    client sizes first, so a refused plan starts nothing."""
    _, train_rows, _ = server.load_rows(config)
    parts = data.partition(train_rows, config.data, config.federation.num_clients, config.seed)
    make_plan(config, [len(p) for p in parts])
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    sites = []
    for cid, part in enumerate(parts):
        path = folder / f"site{cid}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")
        path.chmod(0o600)
        site: dict[str, object] = {"partition-id": cid, "path": str(path), **site_policy(config)}
        if config.site.ledger_dir:  # else beside the site's data, which goes with the run
            site["ledger"] = str(Path(config.site.ledger_dir).resolve() / f"client-{cid}.json")
        sites.append(site)
    return sites


def site_policy(config: RunConfig) -> dict[str, object]:
    """Return the node-config keys that give a site the policy of the config's [site]
    section: the same policy the simulation's sites hold."""
    s = config.site
    keys: dict[str, object] = {"modes": ",".join(s.modes),
                               "allow-non-private": s.allow_non_private}
    if s.max_epsilon is not None:
        keys["max-epsilon"] = s.max_epsilon
    if s.delta is not None:
        keys["delta"] = s.delta
    return keys


@dataclass(frozen=True)
class LocalRun:
    """What a local deployment leaves: the summary, and the ServerApp's own log (which says
    why any update was left out; the operator's to read, never part of the run directory)."""

    summary: dict
    server_log: str


def run_local(config: RunConfig, out: Path, overwrite: bool = False, secure: bool = False,
              app: Path | None = None,
              on_round: Callable[[dict], None] | None = None,
              on_site: Callable[[list[dict]], None] | None = None,
              on_start: Callable[[LocalFederation], None] | None = None,
              poll: float = 1.0, resume: bool = False) -> LocalRun:
    """Run ``config`` over a local Flower federation of ``federation.num_clients`` SuperNodes.

    ``app`` replaces the privlora Flower App (tests use a faulty one); ``on_site(sites)`` may
    edit the sites' node-configs before the SuperNodes start; ``on_start(federation)`` sees
    the running federation; ``on_round(row)`` sees each metrics.jsonl line as it lands.
    ``resume`` restarts the ServerApp on the stopped run in ``out`` (whose own config must be
    ``config``: the sites' data is split from it).
    """
    out = out.resolve()
    config = recipe.resolve(config).config  # the sites' split and run.toml take its values
    # an overwritten run's files stay until the ServerApp clears them: not this run's rows
    since = None if resume else time.time()
    if not resume:
        check_target(out, overwrite)
    work = Path(tempfile.mkdtemp(prefix="privlora-flower-"))
    federation = LocalFederation(work, config.federation.num_clients, secure)
    failed = True
    try:
        sites = write_sites(config, work / "sites")
        if config.quantization.quantized_base:
            _write_bundle(config, work / "bundle", sites)
        if on_site:
            on_site(sites)
        (work / "run.toml").write_text(to_toml(config))
        federation.start(sites)
        sys.stderr.write(f"privlora: a SuperLink and {len(sites)} SuperNodes on 127.0.0.1"
                         + (" (TLS, node authentication)" if secure else "") + "\n")
        if on_start:
            on_start(federation)
        run_id = federation.submit(app or app_dir(), work / "run.toml", out, overwrite, resume)
        status = _follow(federation, run_id, out, on_round, poll, since)
        log = federation.server_log(run_id)
        if status != "finished:completed":
            raise DeploymentFailed(_failure(log, status))
        failed = False
        return LocalRun(json.loads((out / "summary.json").read_text()), log)
    finally:
        federation.processes.stop()
        shutil.rmtree(work / "sites", ignore_errors=True)  # the sites' rows never stay behind
        if failed and federation.processes.started:
            sys.stderr.write(f"privlora: the federation's logs are kept in {federation.logs}\n")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _write_bundle(config: RunConfig, folder: Path, sites: list[dict]) -> None:
    from privlora.models import load_model, load_tokenizer
    from privlora.quantization.bundle import write_bundle

    write_bundle(load_model(config.model.name, config.model.dtype, "cpu"),
                 load_tokenizer(config.model.name), config.quantization.base, folder,
                 config.model.name)
    for site in sites:
        site["bundle"] = str(folder)


def _follow(federation: LocalFederation, run_id: int, out: Path,
            on_round: Callable[[dict], None] | None, poll: float,
            since: float | None = None) -> str:
    """Wait for the run to finish, passing each new metrics line to ``on_round`` (files last
    written before ``since`` are an overwritten run's, not yet cleared: skipped).

    The run directory is read every ``poll`` seconds (cheap); the run's status is asked of the
    SuperLink every STATUS_EVERY seconds and once summary.json appears. Why not every poll: each
    ``flwr ls`` is a new Python process, and at one a second they took most of a core from the
    sites' training on a 2-core machine.
    """
    seen, asked = 0, 0.0

    def ours(path: Path) -> bool:
        return path.exists() and (since is None or path.stat().st_mtime >= since)

    while True:
        metrics = out / "metrics.jsonl"
        # complete lines only: the server may be writing the last one
        lines = metrics.read_text().split("\n")[:-1] if ours(metrics) else []
        for line in lines[seen:]:
            if on_round:
                on_round(json.loads(line))
        seen = len(lines)
        if ours(out / "summary.json") or time.time() - asked > STATUS_EVERY:
            asked = time.time()
            status = federation.status(run_id)
            if status.startswith("finished"):
                return status
        time.sleep(poll)


def _failure(log: str, status: str) -> str:
    reasons = [line.split("privlora: run failed: ", 1)[1] for line in log.splitlines()
               if "privlora: run failed: " in line]
    reason = reasons[-1] if reasons else log.strip()[-1500:]
    return f"the Flower run ended {status}: {reason}"
