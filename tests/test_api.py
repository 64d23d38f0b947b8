"""The local API against a real swarm: two server processes (one serving the API beside its
blocks) and a client-only ``petald daemon``, reached through the official ``openai`` package
and ``curl --unix-socket``; ``petald generate``, ``chat`` and ``swarm`` (run in this process)
through the daemon and without it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import msgpack
import pytest
import torch

from petald.cli.local_swarm import LocalSwarm
from tests.oracle import reference_greedy
from tests.petald_cli import PETALD, assert_refused, invoke
from tests.tiny_models import save_tiny_chat_model

pytestmark = pytest.mark.slow

CURL = shutil.which("curl")


class Daemon:
    """A ``petald daemon`` process, its output read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen([*PETALD, "daemon", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.output: list[str] = []
        self.http = ""
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            if "local API on http://" in line:
                self.http = line.split("local API on ", 1)[1].strip()
            if self.http and "local API on unix:" in "\n".join(self.output):
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 120) -> None:
        self.ready.wait(timeout)
        if not self.http or self.process.poll() is not None:
            raise RuntimeError("the daemon did not start:\n" + "\n".join(self.output[-20:]))


class Swarm:
    def __init__(self, model: Path, servers: LocalSwarm, server_socket: Path, daemon: Daemon, daemon_socket: Path,
                 notify: socket.socket, env: dict[str, str], server_notify: socket.socket):
        self.model, self.servers, self.server_socket = model, servers, server_socket
        self.daemon, self.daemon_socket, self.notify, self.env = daemon, daemon_socket, notify, env
        self.server_notify = server_notify

    @property
    def first(self) -> str:
        return self.servers.addresses[0]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model = save_tiny_chat_model(root / "tinychat")
    server_socket, daemon_socket = root / "server.sock", root / "daemon.sock"
    notify_path = root / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PETALD_")}
    env.update(PYTHONUNBUFFERED="1", PETALD_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "petald-cache"),
               XDG_RUNTIME_DIR=str(root / "runtime"), XDG_CONFIG_HOME=str(root / "config"))
    server_notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server_notify.bind(str(root / "server-notify.sock"))
    server_notify.settimeout(0.2)
    with LocalSwarm(["0:3"], model=str(model), extra_args=["--threads", "1"]) as servers:
        os.environ["NOTIFY_SOCKET"] = str(root / "server-notify.sock")  # LocalSwarm passes os.environ on
        try:
            servers.add("3:6", extra_args=["--socket", str(server_socket)])
        finally:
            del os.environ["NOTIFY_SOCKET"]
        daemon = Daemon(["--initial-peers", servers.addresses[0], "--model", str(model), "--socket",
                         str(daemon_socket), "--http", "127.0.0.1:0", "-v"], dict(env, NOTIFY_SOCKET=str(notify_path)))
        try:
            daemon.wait_ready()
            yield Swarm(model, servers, server_socket, daemon, daemon_socket, notify, env, server_notify)
        finally:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
    notify.close()
    server_notify.close()


def openai_client(socket_path: Path):
    import openai

    transport = httpx.HTTPTransport(uds=str(socket_path))
    return openai.OpenAI(api_key="unused", base_url="http://petald/v1", http_client=httpx.Client(transport=transport))


def curl(socket_path: Path, path: str, *args: str) -> tuple[int, str]:
    if CURL is None:
        pytest.skip("curl is not installed")
    result = subprocess.run([CURL, "-sS", "--unix-socket", str(socket_path), "-w", "\n%{http_code}", *args,
                             f"http://petald{path}"], capture_output=True, text=True, timeout=120)
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def petald(swarm: Swarm, *args: str, stdin: str | None = None, socket_path: Path | None = None):
    """``petald ARGS`` in this process, with the module daemon's socket as the local API."""
    return invoke(*args, input=stdin, env={"PETALD_SOCKET": str(socket_path or swarm.daemon_socket)})


def tokenizer(swarm: Swarm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(swarm.model))


def oracle_text(swarm: Swarm, ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
    """transformers' greedy continuation, cut after the first EOS as petald stops there.

    The daemon's client, and the commands' own client nodes here, run the default wire (auto):
    float16 on every hop, since no server of this swarm announces a bandwidth. Measured: the
    oracle's exact tokens for every prompt of this file, so the tests assert them exactly."""
    tok = tokenizer(swarm)
    new = reference_greedy(str(swarm.model), torch.tensor([ids]), max_new_tokens)
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True), new


def chat_ids(swarm: Swarm, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer(swarm).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])


def oracle_chat(swarm: Swarm, lines: list[str], max_new_tokens: int) -> list[str]:
    """The answers of a conversation, each turn the oracle's greedy continuation of the whole history."""
    history: list[dict[str, str]] = []
    answers = []
    for line in lines:
        history.append({"role": "user", "content": line})
        answer, _ = oracle_text(swarm, chat_ids(swarm, history), max_new_tokens)
        answers.append(answer)
        history.append({"role": "assistant", "content": answer})
    return answers


# --- the OpenAI package --------------------------------------------------------------------------

def test_openai_completions_are_the_oracles_greedy_tokens(swarm):
    client = openai_client(swarm.server_socket)
    model_id = client.models.list().data[0].id
    assert model_id.startswith("tinychat@")
    prompt = "The capital of France is"
    ids = tokenizer(swarm)(prompt)["input_ids"]
    expected, new = oracle_text(swarm, ids, 12)
    answer = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0)
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == len(new) and answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].finish_reason == ("stop" if len(new) < 12 else "length")
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


def test_openai_chat_streams_the_same_text_as_distributed_model(swarm):
    from petald.p2pnode.client.distributed_model import DistributedModel

    client = openai_client(swarm.server_socket)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
    with DistributedModel(model=str(swarm.model), initial_peers=[swarm.first]) as model:
        ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
        eos = model.tokenizer.eos_token_id
        out = model.generate(ids, max_new_tokens=10, eos_token_id=[eos])
        expected = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    whole = client.chat.completions.create(model="tinychat", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tinychat", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == out.shape[1] - ids.shape[1]


def test_openai_errors_are_openai_errors(swarm):
    import openai

    client = openai_client(swarm.server_socket)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert info.value.code == "model_not_found" and "tinychat@" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tinychat", prompt="hi", max_tokens=2, n=2)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tinychat", messages=[{"role": "wizard", "content": "x"}])
    assert info.value.param == "messages"


def test_stop_strings_cut_the_text(swarm):
    client = openai_client(swarm.server_socket)
    full = client.completions.create(model="tinychat", prompt="Once upon a time", max_tokens=10, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop.strip()) > 0
    cut = client.completions.create(model="tinychat", prompt="Once upon a time", max_tokens=10, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tinychat", prompt="Once upon a time", max_tokens=10, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]


def test_concurrent_requests_get_their_own_answers(swarm):
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(swarm.daemon_socket)
    prompts = ["One", "Two birds", "Three little pigs", "Four"]

    def ask(prompt: str, stream: bool) -> str:
        answer = client.completions.create(model="tinychat", prompt=prompt, max_tokens=8, temperature=0,
                                           stream=stream)
        return "".join(c.choices[0].text for c in answer) if stream else answer.choices[0].text

    alone = [ask(p, False) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts, [True, False] * 2))
    assert together == alone and len(set(alone)) > 1


def test_a_client_that_leaves_stops_its_generation(swarm):
    def health() -> dict:
        return json.loads(curl(swarm.daemon_socket, "/health")[1])

    before = health()["tokens_generated"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(swarm.daemon_socket)), timeout=60) as client, \
            client.stream("POST", "http://petald/v1/completions",
                          # Sampled from a random model: EOS (1 of 49152 tokens) all but never ends it early.
                          json={"prompt": "Go", "max_tokens": 500, "temperature": 1, "seed": 1,
                                "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert health()["generations"] == 1
    deadline = time.monotonic() + 30
    while health()["generations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health()["generations"] == 0
    assert health()["tokens_generated"] - before < 500  # it stopped, rather than running to max_tokens


def test_prompt_and_max_tokens_must_fit_the_context(swarm):
    status, body = curl(swarm.daemon_socket, "/v1/completions", "-d", '{"prompt": "Go", "max_tokens": 4000}')
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"


# --- curl, the daemon, and bad input -------------------------------------------------------------

def test_curl_on_the_daemon_socket(swarm):
    status, body = curl(swarm.daemon_socket, "/health")
    assert status == 200 and json.loads(body)["role"] == "client" and json.loads(body)["head_quant"] == "none"
    status, body = curl(swarm.daemon_socket, "/v1/swarm")
    assert status == 200
    (model,) = json.loads(body)["models"]
    assert model["uncovered_blocks"] == [] and len(model["servers"]) == 2
    status, body = curl(swarm.daemon_socket, "/v1/chat/completions", "-N", "-H", "content-type: application/json",
                        "-d", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                          "temperature": 0, "stream": True}))
    assert status == 200
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    expected, new = oracle_text(swarm, chat_ids(swarm, [{"role": "user", "content": "hi"}]), 4)
    assert "".join(c["delta"].get("content") or "" for c in chunks) == expected
    assert chunks[-1]["finish_reason"] == ("stop" if len(new) < 4 else "length")
    # The same API on TCP.
    assert httpx.get(f"{swarm.daemon.http}/v1/models").json()["data"][0]["id"].startswith("tinychat@")


def test_the_daemon_logs_each_request_with_v(swarm):
    """``petald daemon -v``: one line per request, once its response has ended."""
    assert curl(swarm.daemon_socket, "/health")[0] == 200
    assert curl(swarm.daemon_socket, "/no/such/endpoint")[0] == 404
    pattern = re.compile(r"INFO petald\.api\.requests: GET (/health 200|/no/such/endpoint 404) \d+\.\d{3} s$")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logged = {m.group(1) for m in map(pattern.search, list(swarm.daemon.output)) if m}
        if logged == {"/health 200", "/no/such/endpoint 404"}:
            break
        time.sleep(0.1)
    assert logged == {"/health 200", "/no/such/endpoint 404"}, swarm.daemon.output[-10:]


def scrape(socket_path: Path) -> dict[tuple[str, tuple], float]:
    """``GET /metrics``, parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = curl(socket_path, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def _refused_open(swarm: Swarm, max_length: int) -> dict:
    """An open of ``max_length`` tokens sent to the API's own server (blocks 3:6); its error frame."""
    import trio
    from libp2p.custom_types import TProtocol

    from petald.kernels.sources.open_source import open_source
    from petald.p2pnode.client.node_thread import NodeThread
    from petald.p2pnode.transport.framed_stream import FramedStream
    from petald.p2pnode.transport.host import parse_peer_address
    from petald.p2pnode.transport.identity import load_or_create_identity
    from petald.protocol.limits import INFERENCE_PROTOCOL
    from petald.protocol.messages import OpenSession

    identity = open_source(str(swarm.model)).identity
    peer = parse_peer_address(swarm.servers.addresses[1])
    node = NodeThread(load_or_create_identity(None))

    async def open_too_long() -> dict:
        with trio.fail_after(30):
            await node.host.connect(peer)
            framed = FramedStream(await node.host.new_stream(peer.peer_id, [TProtocol(INFERENCE_PROTOCOL)]))
            await framed.send(OpenSession(identity.model_id, identity.fingerprint, 3, 6, 1, max_length).to_wire())
            reply = await framed.receive()
            await framed.close()
            return reply

    try:
        return node.call(open_too_long)
    finally:
        node.stop()


def test_metrics_count_what_the_node_did(swarm):
    """``GET /metrics`` on a server's API: its blocks' sessions and steps, its API client's tokens,
    what crossed the wire, refusals by reason, in Prometheus' text format."""
    before = scrape(swarm.server_socket)
    status, body = curl(swarm.server_socket, "/v1/completions", "-H", "content-type: application/json", "-d",
                        json.dumps({"prompt": "The sky is", "max_tokens": 5, "temperature": 0}))
    assert status == 200
    tokens = json.loads(body)["usage"]["completion_tokens"]
    assert _refused_open(swarm, 100_000)["code"] == "too_large"
    after = scrape(swarm.server_socket)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("petald_tokens_generated_total") == tokens
    assert grew("petald_client_sessions_total") == 1 and grew("petald_server_sessions_total") == 1
    assert grew("petald_server_steps_total") == tokens  # the prompt's step, then one per token but the last
    assert grew("petald_server_step_seconds_count") == tokens
    assert grew("petald_client_step_seconds_count") == tokens
    assert grew("petald_server_refusals_total", reason="too_large") == 1
    assert grew("petald_client_failovers_total") == 0
    assert grew("petald_wire_bytes_total", direction="in") > 0 and grew("petald_wire_bytes_total", direction="out") > 0
    assert after[("petald_kv_pages", (("state", "total"),))] > 0
    assert after[("petald_kv_pages", (("state", "reserved"),))] == 0  # every session closed, its pages freed
    assert after[("petald_server_sessions_live", ())] == 0
    assert after[("petald_dht_records", ())] >= 1  # its own record at least (others as the keys fall)
    # The client daemon: a node of its own, whose registry holds no server's counts.
    daemon = scrape(swarm.daemon_socket)
    assert daemon[("petald_server_sessions_total", ())] == 0 and ("petald_kv_pages", (("state", "total"),)) not in daemon


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Dom(HTMLParser):
    """The rendered page: each element's text by id, and the attributes of every element."""

    def __init__(self, html: str):
        super().__init__()
        self.text: dict[str, str] = {}
        self.elements: list[dict[str, str]] = []
        self._open: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append(attributes)
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append(attributes.get("id"))
            if attributes.get("id"):
                self.text[attributes["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in ("meta", "link", "br", "img", "input"):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id:
                self.text[element_id] += data


def chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, its scripts run for 8 s of virtual time (fetches pause it)."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=8000", *args, url],
                          capture_output=True, text=True, timeout=180)


def test_the_dashboard_shows_the_swarm_and_this_node(swarm, tmp_path):
    """``GET /`` in a real browser: the page polls the node's figures and the swarm map and draws them."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the dashboard is tested in a browser")
    status, page = curl(swarm.daemon_socket, "/")  # the socket serves it too
    assert status == 200 and "<title>petald</title>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external assets: works offline
    status, body = curl(swarm.daemon_socket, "/v1/completions", "-H", "content-type: application/json", "-d",
                        json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0}))
    assert status == 200
    health = json.loads(curl(swarm.daemon_socket, "/health")[1])
    generated = health["tokens_generated"]
    assert health["generations_total"] >= 1 and health["generations"] == 0 and health["tokens_per_s"] >= 0
    rendered = chromium(f"{swarm.daemon.http}/", tmp_path, "--dump-dom")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = _Dom(rendered.stdout)
    assert dom.text["status"].startswith("updated "), dom.text["status"]
    assert dom.text["model"].startswith("tinychat@") and dom.text["role"] == "client daemon"
    assert dom.text["node-tokens"] == str(generated) and dom.text["node-kv-pages"] == "no blocks"
    assert dom.text["node-failovers"] == "0"
    blocks = {int(e["data-block"]): int(e["data-servers"]) for e in dom.elements if "data-block" in e}
    assert blocks == {b: 1 for b in range(6)}  # servers 0:3 and 3:6: every block held once
    assert dom.text["coverage"] == "every block is served"
    peers = {e["data-peer"] for e in dom.elements if "data-peer" in e}
    assert peers == {a.rsplit("/p2p/", 1)[1] for a in swarm.servers.addresses}
    assert page.count('class="tag ') == 0 and rendered.stdout.count('class="tag direct"') == 2  # drawn by the script
    shot = tmp_path / "dashboard.png"
    taken = chromium(f"{swarm.daemon.http}/", tmp_path, f"--screenshot={shot}", "--window-size=1280,900")
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", taken.stderr[-2000:]


def test_a_servers_api_stores_its_lm_head_as_told(swarm, tmp_path):
    """``petald serve --head-quant bf16``: its API's model keeps the LM head in bfloat16 and answers."""
    api_socket = tmp_path / "bf16-head.sock"
    with LocalSwarm(["0:6"], model=str(swarm.model),
                    extra_args=["--threads", "1", "--socket", str(api_socket), "--head-quant", "bf16"]):
        deadline = time.monotonic() + 60
        while not api_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        status, body = curl(api_socket, "/health")
        assert status == 200 and json.loads(body)["role"] == "server"
        assert json.loads(body)["head_quant"] == "bf16"
        prompt_ids = tokenizer(swarm)("Once upon a time")["input_ids"]
        _, oracle = oracle_text(swarm, prompt_ids, 4)
        assert len(oracle) == 4  # no EOS among them: the answer runs to max_tokens
        answer = openai_client(api_socket).completions.create(model="tinychat", prompt="Once upon a time",
                                                                max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), 4)
        assert json.loads(curl(api_socket, "/health")[1])["model_loaded"]


@pytest.mark.parametrize("path, args, status, message", [
    ("/v1/completions", ["-d", "{not json"], 400, "not valid JSON"),
    ("/v1/completions", ["-d", "[1, 2]"], 400, "JSON object"),
    ("/v1/completions", ["-d", '{"prompt": "hi", "max_tokens": -1}'], 400, "max_tokens"),
    ("/v1/completions", ["-d", '{"prompt": ""}'], 400, "prompt"),
    ("/v1/completions", ["-d", '{"prompt": [999999]}'], 400, "token ids"),
    ("/v1/chat/completions", ["-d", '{"messages": []}'], 400, "messages"),
    ("/v1/chat/completions", ["-d", '{"model": "llama-70b", "messages": [{"role": "user", "content": "x"}]}'],
     404, "does not exist"),
    ("/v1/completions", ["-X", "GET"], 405, "no endpoint"),
    ("/v1/nothing", [], 404, "no endpoint"),
])
def test_bad_requests_get_openai_errors_and_the_daemon_stays_up(swarm, path, args, status, message):
    got, body = curl(swarm.daemon_socket, path, *args)
    assert got == status, body
    error = json.loads(body)["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert curl(swarm.daemon_socket, "/health")[0] == 200
    assert not [line for line in swarm.daemon.output if "Traceback" in line or "ERROR" in line]  # expected, not bugs


@pytest.mark.parametrize("body, message", [
    # Issue 22, hole 3: both were 500s.
    ('{"prompt": "\\ud800"}', "lone UTF-16 surrogate ('\\ud800')"),
    ('{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "lone UTF-16 surrogate"),
    ('{"\\ud83d": 1, "prompt": "x"}', "lone UTF-16 surrogate"),
    ('{"prompt": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}", "deeper than 64 levels"),
    ('{"prompt": "x", "n": ' + "[" * 100 + "]" * 100 + "}", "deeper than 64 levels"),
])
def test_json_the_api_cannot_use_is_a_400(swarm, tmp_path, body, message):
    request = tmp_path / "request.json"
    request.write_text(body)
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, answer = curl(swarm.daemon_socket, path, "-H", "content-type: application/json",
                              "--data-binary", f"@{request}")
        assert status == 400 and message in json.loads(answer)["error"]["message"], answer
    # A valid surrogate pair is text like any other.
    assert curl(swarm.daemon_socket, "/v1/completions", "-d", '{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')[0] == 200
    assert not [line for line in swarm.daemon.output if "Traceback" in line or "ERROR" in line]


def test_oversized_body_is_refused(swarm, tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"prompt": "x" * (5 * 1024 * 1024)}))
    status, body = curl(swarm.daemon_socket, "/v1/completions", "-H", "content-type: application/json",
                        "--data-binary", f"@{big}")
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert curl(swarm.daemon_socket, "/health")[0] == 200


def _native(swarm: Swarm, message: dict) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(swarm.daemon_socket))) as client:
        return client.post("http://petald/petald/v1/run_blocks", content=msgpack.packb(message, use_bin_type=True),
                           headers={"content-type": "application/msgpack"}, timeout=120)


def test_native_span_endpoint_matches_run_blocks(swarm):
    from petald.p2pnode.client.distributed_model import DistributedModel
    from petald.protocol.tensors import decode_tensor, encode_tensor

    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    answer = _native(swarm, {"start": 1, "end": 5, "hidden": encode_tensor(hidden)})
    assert answer.status_code == 200, answer.text
    reply = msgpack.unpackb(answer.content)
    assert (reply["start"], reply["end"]) == (1, 5)
    with DistributedModel(model=str(swarm.model), initial_peers=[swarm.first]) as model:
        expected = model.run_blocks(hidden, 1, 5)
    torch.testing.assert_close(decode_tensor(reply["hidden"]), expected)


@pytest.mark.parametrize("message, status, text", [
    ({"start": 0, "end": 2, "hidden": "x"}, 400, "hidden"),
    ({"start": 0, "end": 9, "hidden": None}, 400, "start < end <= 6"),
    ({"start": 0, "end": 2, "hidden": {"dtype": "int8", "shape": [1, 1, 64], "data": b"\0" * 64}}, 400, "dtype"),
    ({"start": 0, "end": 2, "hidden": {"dtype": "float32", "shape": [1, 1, 32], "data": b"\0" * 128}}, 400,
     "[batch, tokens, 64]"),
    ({"start": 0, "end": 2, "hidden": {"dtype": "float32", "shape": [1, 2, 64], "data": b"\0" * 16}}, 400, "bytes"),
])
def test_native_endpoint_refuses_bad_tensors(swarm, message, status, text):
    answer = _native(swarm, message)
    assert answer.status_code == status
    assert text in answer.json()["error"]["message"]
    not_msgpack = httpx.Client(transport=httpx.HTTPTransport(uds=str(swarm.daemon_socket))).post(
        "http://petald/petald/v1/run_blocks", content=b"\xc1garbage")
    assert not_msgpack.status_code == 400
    assert curl(swarm.daemon_socket, "/health")[0] == 200


# --- the command line with and without the daemon ------------------------------------------------

def test_generate_uses_the_daemon_and_falls_back_to_its_own_node(swarm):
    prompt = "The capital of France is"
    expected, _ = oracle_text(swarm, tokenizer(swarm)(prompt)["input_ids"], 8)
    through_daemon = petald(swarm, "generate", prompt, "--max-new-tokens", "8")
    assert through_daemon.exit_code == 0, through_daemon.output
    assert through_daemon.stderr == f"petald: using the local daemon at {swarm.daemon_socket}\n"
    assert through_daemon.stdout == expected + "\n"
    alone = petald(swarm, "generate", prompt, "--max-new-tokens", "8", "--model", str(swarm.model),
                   "--initial-peers", swarm.first)
    assert alone.exit_code == 0, alone.output
    assert alone.stderr == ("petald: joining the swarm through 1 initial peer(s)... (a daemon stays joined, so "
                            "commands start at once: petald daemon --initial-peers ADDR)\n")
    assert alone.stdout == expected + "\n"
    wired = petald(swarm, "generate", prompt, "--wire", "int8")  # the daemon's own client picks its wire
    assert wired.exit_code == 2 and wired.stderr.endswith(
        "\nError: --wire applies to a client node of this command's own: give the swarm with --initial-peers "
        "(or --peers); the daemon's client picks its wire per hop\n"), wired.output
    missing = swarm.daemon_socket.with_name("none.sock")
    no_daemon = petald(swarm, "generate", prompt, socket_path=missing)
    assert_refused(no_daemon, 2, f"no local daemon answers on {missing}, and no swarm was given: give any node of "
                                 "the swarm with --initial-peers MULTIADDR (or the servers themselves with --peers "
                                 "MULTIADDR ...), or start a daemon (petald serve / petald daemon)")


STATS = re.compile(r"petald: (\d+) tokens in \d+\.\d\d s, \d+\.\d tokens/s after the first "
                   r"\(first token after \d+\.\d\d s\); route: (.+)$")


def test_generate_stats_say_tokens_speed_and_route(swarm):
    prompt = "The capital of France is"
    _, new = oracle_text(swarm, tokenizer(swarm)(prompt)["input_ids"], 6)
    through_daemon = petald(swarm, "generate", prompt, "--max-new-tokens", "6", "--stats")
    assert through_daemon.exit_code == 0, through_daemon.output
    summary = STATS.match(through_daemon.stderr.splitlines()[-1])
    assert summary and int(summary.group(1)) == len(new), through_daemon.stderr
    assert summary.group(2) == f"through the local daemon at {swarm.daemon_socket}"
    alone = petald(swarm, "generate", prompt, "--max-new-tokens", "6", "-v", "--model", str(swarm.model),
                   "--initial-peers", swarm.first)
    assert alone.exit_code == 0, alone.output
    summary = STATS.match(alone.stderr.splitlines()[-1])
    assert summary and int(summary.group(1)) == len(new), alone.stderr
    hops = summary.group(2).split(" -> ")
    assert [hop.split("@")[0] for hop in hops] == ["0:3", "3:6"], hops  # the two servers, each named


def test_swarm_watch_redraws_the_table(swarm):
    result = petald(swarm, "swarm", "--watch", "--interval", "0.1", "--count", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("petald swarm  (every 0.1 s, ") == 2 and result.stdout.count("every block is served") == 2
    assert "\x1b[" not in result.stdout  # not a terminal: no screen clearing


def test_generate_stops_at_any_of_a_list_of_end_of_sequence_ids(swarm, tmp_path):
    """Llama 3 configs carry several end-of-sequence ids (a list): ``petald generate`` takes them
    all and stops at whichever comes first."""
    prompt = "The capital of France is"
    tok = tokenizer(swarm)
    new = reference_greedy(str(swarm.model), torch.tensor([tok(prompt)["input_ids"]]), 8)
    stop_at = next(i for i in range(1, len(new)) if new[i] not in new[:i])  # the first token not seen before
    assert tok.eos_token_id not in new[: stop_at + 1]
    expected = tok.decode(new[: stop_at + 1], skip_special_tokens=True)
    assert expected != tok.decode(new, skip_special_tokens=True)  # stopping there shows in the text
    # The same directory name and weights (so the same model id as the servers'), but a config whose
    # eos_token_id is a list: the tokenizer's EOS and the token greedy decoding reaches at stop_at.
    model = tmp_path / swarm.model.name
    model.mkdir()
    for file in swarm.model.iterdir():
        if file.name != "config.json":
            (model / file.name).symlink_to(file)
    config = json.loads((swarm.model / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], new[stop_at]]
    (model / "config.json").write_text(json.dumps(config))
    result = petald(swarm, "generate", prompt, "--max-new-tokens", "8", "--model", str(model),
                    "--initial-peers", swarm.first)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_chat_through_the_daemon_and_alone_say_the_same(swarm):
    lines = ["Hello!", "Tell me more."]
    expected = "".join(answer + "\n" for answer in oracle_chat(swarm, lines, 6))
    stdin = "\n".join(lines) + "\n/exit\n"
    through_daemon = petald(swarm, "chat", "--max-new-tokens", "6", stdin=stdin)
    assert through_daemon.exit_code == 0, through_daemon.output
    assert through_daemon.stdout == expected
    alone = petald(swarm, "chat", "--max-new-tokens", "6", "--no-daemon", "--model", str(swarm.model),
                   "--initial-peers", swarm.first, stdin=stdin)
    assert alone.exit_code == 0, alone.output
    assert alone.stdout == expected


def test_swarm_command_reads_the_daemons_map(swarm):
    model_id = openai_client(swarm.daemon_socket).models.list().data[0].id
    result = petald(swarm, "swarm")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{model_id}  (6 blocks, 2 of 2 servers online)\n"), result.stdout
    assert "every block is served" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    assert sorted(r[1:3] for r in rows if r and r[0].startswith("..")) == [["0:3", "online"], ["3:6", "online"]]
    assert [r[:2] for r in rows if r and r[0] in ("0:3", "3:6")] == [["0:3", "1"], ["3:6", "1"]]


def test_socket_is_private_and_not_taken_over(swarm):
    for path in (swarm.server_socket, swarm.daemon_socket):
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    second = invoke("daemon", "--initial-peers", swarm.first, "--socket", str(swarm.daemon_socket))
    assert_refused(second, 1, f"petald: error: another petald daemon is already serving its API on "
                              f"{swarm.daemon_socket}: stop it (one daemon serves every command of this machine), "
                              "or give this one another --socket")
    assert second.stdout == ""  # refused before opening the model
    assert curl(swarm.daemon_socket, "/health")[0] == 200


def received(receiver: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode())
        except TimeoutError:
            return messages


def test_server_tells_systemd_when_it_is_routable(swarm):
    messages = received(swarm.server_notify)
    statuses = [m for m in messages if m.startswith("STATUS=")]
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    serving = next(i for i, m in enumerate(messages) if m.startswith("STATUS=serving blocks 3:6"))
    assert serving < ready  # READY=1 means routable, with the API listening
    assert "local API" in messages[ready]
    assert any("loading blocks 3:6" in m for m in statuses) and all("\n" not in m for m in statuses)


def test_daemon_and_server_stop_cleanly(swarm):
    """Runs last: it stops the module's daemon and its API server."""
    messages = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
        try:
            messages.append(swarm.notify.recv(4096).decode())
        except TimeoutError:
            pass
    assert any("READY=1" in m for m in messages), messages
    swarm.daemon.process.send_signal(signal.SIGTERM)
    assert swarm.daemon.process.wait(30) == 0
    while True:
        try:
            messages.append(swarm.notify.recv(4096).decode())
        except TimeoutError:
            break
    assert any("STOPPING=1" in m for m in messages)
    assert not swarm.daemon_socket.exists()
    server = swarm.servers.servers[1]
    assert server.stop(signal.SIGTERM) == 0
    assert not swarm.server_socket.exists()
    assert any("STOPPING=1" in m for m in received(swarm.server_notify))
