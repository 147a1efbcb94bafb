"""`bitbasis serve` driven as its users drive it: the real `openai` client (streaming and not), curl,
and the chat page in a headless browser, against a server process on localhost; replies equal
`bitbasis generate` / Model.chat for the same seed; every bad input gets OpenAI's JSON error with its
status and the server keeps serving; a client that leaves frees its slot; past the queue, 503."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from bitbasis.engine import engine_available

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
PARALLEL, QUEUE = 2, 2
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture(scope="module")
def speaking_model(model_files):
    return model_files("qbb", 4, 128, rounds=0, iters=0)   # a model that still answers in words


@pytest.fixture(scope="module")
def server(speaking_model, tmp_path_factory):
    port = _port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "bitbasis.cli", "serve", "-m", str(speaking_model),
                                 "--port", str(port), "--parallel", str(PARALLEL), "--queue", str(QUEUE),
                                 "--ctx", "512", "-t", "2", "--api-key", KEY], stdout=f, stderr=subprocess.STDOUT,
                                env=_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start:\n" + log.read_text()
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model(speaking_model):
    from bitbasis.engine import Model
    m = Model(speaking_model, threads=2, n_ctx=512)
    m.tokenizer
    return m


def _client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _alive(url):
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _metric(url, name) -> float:
    for line in httpx.get(url + "/metrics", headers=_auth(), timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# --- replies ----------------------------------------------------------------------------------------

def test_openai_chat_equals_model_chat(server, model):
    c = _client(server)
    r = c.chat.completions.create(model=c.models.list().data[0].id, messages=MESSAGES, max_tokens=24,
                                  temperature=0)
    ref = "".join(model.chat(MESSAGES, max_tokens=24, temperature=0))
    assert r.choices[0].message.content == ref and ref.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(model.tokenize(model.chat_prompt(MESSAGES)))
    assert r.usage.completion_tokens == len(model.last_tokens)


def test_openai_stream_equals_nonstream_with_seed(server, model):
    c = _client(server)
    kw = dict(model="smol-qbb-n4-g128", messages=MESSAGES, max_tokens=20, temperature=0.9, seed=1234)
    whole = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    ref = "".join(model.chat(MESSAGES, max_tokens=20, temperature=0.9, seed=1234))
    assert whole == ref


def test_completion_equals_bitbasis_generate(server, speaking_model):
    prompt = "Once upon a time"
    gen = subprocess.run([sys.executable, "-m", "bitbasis.cli", "generate", "-m", str(speaking_model), "-p", prompt,
                          "-n", "16", "--temp", "0.8", "--seed", "7", "-t", "2", "--ctx", "512"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert gen.returncode == 0, gen.stderr
    c = _client(server)
    r = c.completions.create(model="smol-qbb-n4-g128", prompt=prompt, max_tokens=16, temperature=0.8, seed=7)
    assert r.choices[0].text == gen.stdout[:-1]     # generate ends its output with one newline


def test_curl(server):
    if shutil.which("curl") is None:
        pytest.skip("curl not found")
    body = json.dumps({"messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    out = subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
                          "-d", body, server + "/v1/chat/completions"], capture_output=True, text=True, timeout=120)
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
    out = subprocess.run(["curl", "-sN", "-H", f"Authorization: Bearer {KEY}", "-d",
                          json.dumps({"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}),
                          server + "/v1/chat/completions"], capture_output=True, text=True, timeout=120)
    events = [ln[6:] for ln in out.stdout.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == reply["choices"][0]["message"]["content"]


def test_models_health_metrics(server):
    r = httpx.get(server + "/v1/models", headers=_auth()).json()
    assert r["object"] == "list" and r["data"][0]["id"] == "smol-qbb-n4-g128"
    m = httpx.get(server + "/metrics", headers=_auth())
    assert m.status_code == 200 and "# TYPE bitbasis_requests_total counter" in m.text
    for name in ("bitbasis_tokens_per_second", "bitbasis_queue_depth", "bitbasis_completion_tokens_total"):
        assert name in m.text


def test_api_key(server):
    body = {"messages": MESSAGES, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
            r = httpx.request(method, server + path, json=body if method == "POST" else None, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/").status_code == 200     # the page asks for the key itself


# --- bad input ----------------------------------------------------------------------------------------

BAD = [
    ("malformed json", "POST", "/v1/chat/completions", b"{not json", 400, None),
    ("body not an object", "POST", "/v1/chat/completions", [1, 2], 400, None),
    ("messages missing", "POST", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("messages a string", "POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("message without role", "POST", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages"),
    ("content a number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("temperature a string", "POST", "/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", "POST", "/v1/chat/completions", {"messages": MESSAGES, "temperature": 9}, 400, "temperature"),
    ("top_p out of range", "POST", "/v1/chat/completions", {"messages": MESSAGES, "top_p": -1}, 400, "top_p"),
    ("max_tokens negative", "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens a float", "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens absurd", "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**12}, 400, "max_tokens"),
    ("stream a string", "POST", "/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("stop a number", "POST", "/v1/chat/completions", {"messages": MESSAGES, "stop": 5}, 400, "stop"),
    ("n = 3", "POST", "/v1/chat/completions", {"messages": MESSAGES, "n": 3}, 400, "n"),
    ("seed a string", "POST", "/v1/chat/completions", {"messages": MESSAGES, "seed": "x"}, 400, "seed"),
    ("unknown model", "POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, 404, "model"),
    ("prompt over the context", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
    ("completion prompt over the context", "POST", "/v1/completions", {"prompt": "word " * 2000}, 400, "prompt"),
    ("completion prompt a dict", "POST", "/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("token id outside the vocabulary", "POST", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("logprobs", "POST", "/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("empty body", "POST", "/v1/chat/completions", b"", 400, None),
    ("body not utf-8", "POST", "/v1/chat/completions", b"\xff\xfe{", 400, None),
    ("json nested too deeply", "POST", "/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400, None),
    ("lone surrogate", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', 400, None),
    ("body over the size limit", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "' + b"a" * (3 << 20) + b'"}]}', 413, None),
    ("messages empty", "POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("message not an object", "POST", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages"),
    ("content part not text", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("five stop strings", "POST", "/v1/chat/completions", {"messages": MESSAGES, "stop": list("abcde")}, 400, "stop"),
    ("top_k negative", "POST", "/v1/chat/completions", {"messages": MESSAGES, "top_k": -1}, 400, "top_k"),
    ("temperature NaN", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    ("model a number", "POST", "/v1/chat/completions", {"messages": MESSAGES, "model": 5}, 400, "model"),
    ("stream_options a string", "POST", "/v1/chat/completions", {"messages": MESSAGES, "stream_options": "x"}, 400,
     "stream_options"),
    ("max_tokens past the context", "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 600}, 400,
     "max_tokens"),
    ("tools", "POST", "/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ("completion prompt empty array", "POST", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("unknown route", "GET", "/v1/nothing", None, 404, None),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, None),
]


@pytest.mark.parametrize("name,method,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(server, name, method, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    r = httpx.request(method, server + path, headers=_auth(), timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    if param == "messages" and "context" in name:
        assert err["code"] == "context_length_exceeded"
    if param:
        assert err["param"] == param
    _alive(server)


def test_client_leaving_mid_stream_frees_its_slot(server):
    before = _metric(server, "bitbasis_requests_cancelled_total")
    tokens_before = _metric(server, "bitbasis_completion_tokens_total")
    body = {"messages": MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200
        got = []
        for ln in r.iter_lines():
            if ln.startswith("data: "):
                got.append(ln)
            if len(got) >= 3:
                break                       # leave with ~400 tokens still to go
    deadline = time.monotonic() + 60    # far less than the ~400 tokens it asked for take here
    while _metric(server, "bitbasis_slots_busy") > 0 or _metric(server, "bitbasis_requests_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the slot of a client that left was not freed"
        time.sleep(0.2)
    assert _metric(server, "bitbasis_completion_tokens_total") - tokens_before < 400
    _alive(server)


def test_client_leaving_a_plain_request_frees_its_slot(server):
    """The same for a non-streaming request: the client gives up (its read timeout) and goes."""
    before = _metric(server, "bitbasis_requests_cancelled_total")
    body = {"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, headers=_auth(), timeout=httpx.Timeout(60, read=2))
    deadline = time.monotonic() + 60
    while _metric(server, "bitbasis_slots_busy") > 0 or _metric(server, "bitbasis_requests_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the slot of a client that left was not freed"
        time.sleep(0.2)
    _alive(server)


def test_past_the_queue_503_and_nothing_lost(server):
    """PARALLEL + QUEUE long requests at once are all served; the ones beyond get 503 queue_full."""
    import asyncio

    async def one(client, i):
        r = await client.post("/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": 48, "ignore_eos": True,
                                                       "temperature": 0})
        return r.status_code, r.json()

    async def burst(n):
        async with httpx.AsyncClient(base_url=server, headers=_auth(), timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    n = PARALLEL + QUEUE + 4
    res = asyncio.run(burst(n))
    ok = [b for s, b in res if s == 200]
    busy = [b for s, b in res if s == 503]
    assert len(ok) + len(busy) == n, [s for s, _ in res]
    assert len(ok) >= PARALLEL + QUEUE
    assert busy, "no request was turned away past the queue"
    assert all(b["error"]["code"] == "queue_full" for b in busy)
    assert all(b["usage"]["completion_tokens"] == 48 for b in ok)
    _alive(server)


# --- hostile chat templates (in process: one model, one server object per template) -------------------

def test_hostile_templates_get_json_errors(model):
    from starlette.testclient import TestClient
    from test_chat_template import HOSTILE
    from bitbasis.server import Server, build_app
    for name, template in sorted(HOSTILE.items()):
        srv = Server(model, "m", parallel=1, n_ctx=256, queue_size=1, chat_template=template)
        with TestClient(build_app(srv)) as client:
            r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
            assert r.status_code == (400 if name == "raise" else 500), (name, r.text)
            err = r.json()["error"]
            assert err["message"].startswith("chat template") and "\n" not in err["message"], name
            assert client.get("/health").status_code == 200


def with_chat_template(src, dst, template: str):
    """A copy of GGUF `src` whose own tokenizer.chat_template is `template` (the KV rewritten in
    place, the tensor data re-aligned), as a hostile or broken file would ship it."""
    import struct
    import gguf
    r = gguf.GGUFReader(str(src), "r")
    raw = open(src, "rb").read()
    key = "tokenizer.chat_template"
    f = r.fields[key]
    start, end = f.offset, f.offset + sum(p.nbytes for p in f.parts)
    kb, vb = key.encode(), template.encode()
    field = struct.pack("<Q", len(kb)) + kb + struct.pack("<IQ", gguf.GGUFValueType.STRING, len(vb)) + vb
    last = r.tensors[-1].field
    head = raw[:start] + field + raw[end:last.offset + sum(p.nbytes for p in last.parts)]
    align = int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32
    head += b"\0" * (-len(head) % align)
    with open(dst, "wb") as out:
        out.write(head + raw[int(r.data_offset):])
    return dst


IN_FILE = ["huge_repeat", "subclasses", "busy_loop", "recursion", "syntax", "raise"]


@pytest.fixture(scope="module")
def tiny_model_file(tiny_dir, tmp_path_factory):
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("tiny-serve") / "tiny-res2.gguf"
    convert(tiny_dir, out, ConvertOptions(method="residual", bases=2, group=128), progress=False)
    return out


@pytest.mark.parametrize("name", IN_FILE)
def test_hostile_template_in_the_file(tiny_model_file, tmp_path, name):
    """The template inside the GGUF (tokenizer.chat_template), not an override: Model.chat raises a
    one-line ChatTemplateError, the server answers JSON `chat_template_error` and keeps serving, and
    `bitbasis chat` prints one line and goes on to the next message."""
    from starlette.testclient import TestClient
    from test_chat_template import HOSTILE
    from bitbasis.chat_template import ChatTemplateError
    from bitbasis.engine import Model
    from bitbasis.server import Server, build_app
    path = with_chat_template(tiny_model_file, tmp_path / f"{name}.gguf", HOSTILE[name])
    m = Model(path, threads=2, n_ctx=256)
    assert m.chat_template == HOSTILE[name]
    with pytest.raises(ChatTemplateError) as e:
        list(m.chat(MESSAGES, max_tokens=2))
    assert str(e.value).startswith("chat template") and "\n" not in str(e.value)

    srv = Server(m, "m", parallel=1, n_ctx=256, queue_size=1)
    with TestClient(build_app(srv)) as client:
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": True})
        assert r.status_code == (400 if name == "raise" else 500), r.text
        err = r.json()["error"]
        assert err["code"] == "chat_template_error" and err["message"].startswith("chat template"), err
        assert "\n" not in err["message"]
        ok = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert client.get("/health").status_code == 200

    if name not in ("subclasses", "huge_repeat"):   # the CLI's handling is the same for every kind; two suffice
        return
    p = subprocess.run([sys.executable, "-m", "bitbasis.cli", "chat", "-m", str(path), "-n", "4", "-t", "2"],
                       input="Hi\nAnd again\n/exit\n", capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("bitbasis: chat template")]
    assert len(errors) == 2 and "Traceback" not in p.stderr, p.stderr   # one line per message, then on


# --- the chat page in a real browser ---------------------------------------------------------------------

def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (tools/setup.sh test installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_chat_page_streams_a_reply(server, model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    b = _browser()
    try:
        b.get(server + "/")
        wait = WebDriverWait(b, 180)
        wait.until(lambda d: d.find_element(By.ID, "keybox").is_displayed())   # 401 from /v1/models: asks for the key
        key = b.find_element(By.ID, "apikey")
        key.send_keys(KEY)
        for field, value in (("temperature", "0"), ("max_tokens", "24")):
            el = b.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        box = b.find_element(By.ID, "input")
        box.send_keys(MESSAGES[0]["content"])
        box.send_keys(Keys.ENTER)
        done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg[data-state=done], #log .msg.error"))
        assert done[0].get_attribute("data-state") == "done", done[0].text
        ref = "".join(model.chat(MESSAGES, max_tokens=24, temperature=0))
        assert done[0].get_attribute("textContent") == ref
        os.makedirs(os.environ.get("BITBASIS_SCREENSHOTS", "/tmp"), exist_ok=True)
        b.save_screenshot(os.path.join(os.environ.get("BITBASIS_SCREENSHOTS", "/tmp"), "bitbasis-chat-page.png"))
    finally:
        b.quit()
