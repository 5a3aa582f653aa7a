"""minilm-serve with real parts: a trained tiny model in a real server process on 127.0.0.1, the official
``openai`` client, concurrent streaming clients, raw HTTP for the bad-input table; plus the batching
engine in-process (continuous admission, left padding) against ``minilm.sampling.generate``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.error
import urllib.request

import pytest
import torch
from servekit import PAIRS, Server, kit  # noqa: F401  (kit is a fixture)

from minilm.chat import instruction_marker
from minilm.config import SampleConfig, build
from minilm.errors import ConfigError
from minilm.sampling import generate
from minilm.serve import ServeConfig, is_loopback
from minilm.serve.engine import Engine, Request, TextStream
from minilm.serve.main import serve_main

openai = pytest.importorskip("openai")

QUESTIONS = [q for q, _ in PAIRS] + ["Tell me about files", "What is a number?", "How do I loop?",
                                     "What is Python?"]


def served_defaults(**kw) -> SampleConfig:
    """What the server decodes with when a request gives only these controls: SampleConfig's defaults,
    no minimum length."""
    return dataclasses.replace(SampleConfig(min_new_tokens=0), **kw)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)          # the server decodes on one thread: the same float sums here
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(kit, tmp_path_factory, one_thread):  # noqa: F811
    srv = Server(kit, "--max-batch", "16", "--batch-window-ms", "20",
                 log=tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_reference(kit, question: str, cfg: SampleConfig) -> str:  # noqa: F811
    cfg = dataclasses.replace(cfg, stop=[*cfg.stop, instruction_marker(kit.template)])
    return generate(kit.model, kit.tokenizer, [kit.template.format(instruction=question)], cfg)[0]


# --------------------------------------------------------------------------------------------------
# the openai client


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["minilm"]
    health = server.health()
    assert health["status"] == "ok" and health["context_length"] == 128 and health["auth"] is False


def test_completion_equals_generate(client, kit):  # noqa: F811
    prompt = "A list is"
    got = client.completions.create(model="minilm", prompt=prompt, temperature=0, max_tokens=30)
    want = generate(kit.model, kit.tokenizer, [prompt], served_defaults(temperature=0.0, max_new_tokens=30))[0]
    assert got.choices[0].text == want and want
    assert got.usage.prompt_tokens == len(kit.tokenizer.encode(prompt, bos=True))
    assert got.choices[0].finish_reason in ("stop", "length")


def test_completion_controls_and_stop_reach_the_decoder(client, kit):  # noqa: F811
    prompt = "The file"
    got = client.completions.create(model="minilm", prompt=prompt, temperature=0, max_tokens=25, stop=["e"],
                                    extra_body={"repetition_penalty": 1.0, "ban_window": 0, "min_tokens": 3})
    cfg = served_defaults(temperature=0.0, max_new_tokens=25, stop=["e"], repetition_penalty=1.0,
                          ban_window=0, min_new_tokens=3)
    assert got.choices[0].text == generate(kit.model, kit.tokenizer, [prompt], cfg)[0]
    assert "e" not in got.choices[0].text


def test_chat_equals_generate_through_the_template(client, kit):  # noqa: F811
    q = "What is a list?"
    got = client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": q}],
                                         temperature=0, max_tokens=40)
    want = chat_reference(kit, q, served_defaults(temperature=0.0, max_new_tokens=40))
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant" and want.strip()


def test_streaming_chat_deltas_add_up_to_generate(client, kit):  # noqa: F811
    q = "How do I open a file?"
    stream = client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": q}],
                                            temperature=0, max_tokens=40, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            deltas.append(choice.delta.content)
        finish = choice.finish_reason or finish
    assert "".join(deltas) == chat_reference(kit, q, served_defaults(temperature=0.0, max_new_tokens=40))
    assert len(deltas) > 1 and finish in ("stop", "length")


def test_streaming_completion_and_seeded_sampling_equal_generate(client, kit):  # noqa: F811
    prompt = "What is"
    stream = client.completions.create(model="minilm", prompt=prompt, temperature=0.9, seed=7, max_tokens=30,
                                       stream=True)
    text = "".join(c.choices[0].text for c in stream)
    cfg = served_defaults(temperature=0.9, seed=7, max_new_tokens=30)
    assert text == generate(kit.model, kit.tokenizer, [prompt], cfg)[0]


def test_multi_turn_chat_renders_history_like_sft(client, kit):  # noqa: F811
    from minilm.chat import render_turns
    from minilm.sampling import generate_ids

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a dict?"},
                {"role": "assistant", "content": "A dict maps keys to values."},
                {"role": "user", "content": "What is a set?"}]
    got = client.chat.completions.create(model="minilm", messages=messages, temperature=0, max_tokens=30)
    ids = render_turns(kit.tokenizer, kit.template, [("Answer briefly.\nWhat is a dict?",
                                                      "A dict maps keys to values."), ("What is a set?", None)])
    cfg = served_defaults(temperature=0.0, max_new_tokens=30, stop=[instruction_marker(kit.template)])
    want = generate_ids(kit.model, [ids], cfg, eos_id=kit.tokenizer.eos_id, pad_id=kit.tokenizer.pad_id,
                        decode=kit.tokenizer.decode)[0]
    assert got.choices[0].message.content == kit.tokenizer.decode(want).split("### Instruction:")[0]
    assert got.usage.prompt_tokens == len(ids)


# --------------------------------------------------------------------------------------------------
# under load: concurrent streaming clients are batched and give the single-client text


async def _stream_all(url: str, questions: list[str], max_tokens: int) -> list[str]:
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(q: str) -> str:
        stream = await aclient.chat.completions.create(
            model="minilm", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=max_tokens,
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(q) for q in questions)), timeout=180)
    finally:
        await aclient.close()


def test_concurrent_streaming_clients_are_batched_and_match_single_client(client, server, kit):  # noqa: F811
    questions = QUESTIONS[:16]
    single = [client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": q}],
                                             temperature=0, max_tokens=24).choices[0].message.content
              for q in questions]
    before = server.health()["engine"]
    together = asyncio.run(_stream_all(server.url, questions, 24))
    after = server.health()["engine"]
    assert together == single
    assert single == [chat_reference(kit, q, served_defaults(temperature=0.0, max_new_tokens=24))
                      for q in questions]
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens"] - before["tokens"]
    assert after["requests"] - before["requests"] == 16
    assert after["max_decode_batch"] > 1, after
    assert steps < tokens, (steps, tokens)       # serial decoding takes one step per token


# --------------------------------------------------------------------------------------------------
# bad inputs: a 4xx with an OpenAI-style body, and the server keeps serving


def post(url: str, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    ("malformed JSON", COMP, b'{"model": "minilm", "prompt": ', 400, None, "invalid_json"),
    ("not an object", COMP, b'["minilm"]', 400, None, "invalid_json"),
    ("temperature a string", COMP, {"model": "minilm", "prompt": "a", "temperature": "hot"}, 400,
     "temperature", "invalid_type"),
    ("max_tokens a float", COMP, {"model": "minilm", "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens",
     "invalid_type"),
    ("max_tokens a bool", COMP, {"model": "minilm", "prompt": "a", "max_tokens": True}, 400, "max_tokens",
     "invalid_type"),
    ("prompt a number", COMP, {"model": "minilm", "prompt": 3}, 400, "prompt", "invalid_type"),
    ("messages a string", CHAT, {"model": "minilm", "messages": "hi"}, 400, "messages", "invalid_type"),
    ("no prompt", COMP, {"model": "minilm"}, 400, "prompt", "missing_field"),
    ("max_tokens 0", COMP, {"model": "minilm", "prompt": "a", "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),
    ("max_tokens above the limit", CHAT, {"model": "minilm", "messages": USER, "max_tokens": 100000}, 400,
     "max_tokens", "invalid_value"),
    ("prompt + max_tokens too long", COMP, {"model": "minilm", "prompt": "a b c d e f", "max_tokens": 125},
     400, "max_tokens", "context_length_exceeded"),
    ("prompt too long", COMP, {"model": "minilm", "prompt": "the list " * 200}, 400, "prompt",
     "context_length_exceeded"),
    ("top_p above 1", COMP, {"model": "minilm", "prompt": "a", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("min_tokens above max_tokens", COMP, {"model": "minilm", "prompt": "a", "max_tokens": 5,
                                           "min_tokens": 9}, 400, "min_tokens", "invalid_value"),
    ("n above 1", COMP, {"model": "minilm", "prompt": "a", "n": 2}, 400, "n", "unsupported"),
    ("five stop strings", COMP, {"model": "minilm", "prompt": "a", "stop": list("abcde")}, 400, "stop",
     "invalid_value"),
    ("frequency_penalty", COMP, {"model": "minilm", "prompt": "a", "frequency_penalty": 0.5}, 400,
     "frequency_penalty", "unsupported"),
    ("echo", COMP, {"model": "minilm", "prompt": "a", "echo": True}, 400, "echo", "unsupported"),
    ("logprobs", CHAT, {"model": "minilm", "messages": USER, "logprobs": True}, 400, "logprobs", "unsupported"),
    ("tools", CHAT, {"model": "minilm", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools",
     "unsupported"),
    ("unknown model", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    ("unknown role", CHAT, {"model": "minilm", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages", "invalid_value"),
    ("assistant last", CHAT, {"model": "minilm", "messages": USER + [{"role": "assistant", "content": "x"}]},
     400, "messages", "invalid_value"),
    ("no messages", CHAT, {"model": "minilm", "messages": []}, 400, "messages", "invalid_type"),
    ("unknown route", "/v1/embeddings", {"model": "minilm", "input": "x"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("what, path, body, status, param, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_an_openai_error_body(server, what, path, body, status, param, code):
    got, payload = post(server.url, path, body)
    assert got == status, payload
    assert set(payload) == {"error"}
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert (err["param"], err["code"]) == (param, code), err


def test_server_keeps_serving_after_bad_inputs_and_a_dropped_stream(server, client):
    import http.client

    for _, path, body, *_ in BAD:
        post(server.url, path, body)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)   # a client that leaves early
    conn.request("POST", COMP, json.dumps({"model": "minilm", "prompt": "A", "max_tokens": 120,
                                           "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()
    got = client.completions.create(model="minilm", prompt="A list", temperature=0, max_tokens=5)
    assert got.choices[0].finish_reason in ("stop", "length")
    status, payload = post(server.url, "/health", {})
    assert status == 405 and payload["error"]["code"] == "method_not_allowed"
    assert server.health()["status"] == "ok"


# --------------------------------------------------------------------------------------------------
# API key and binding


def test_api_key_is_required_when_set(kit, tmp_path):  # noqa: F811
    from servekit import env1

    srv = Server(kit, "--api-key-env", "TEST_MINILM_KEY", env=dict(env1(), TEST_MINILM_KEY="s3cret"),
                 log=tmp_path / "server.log")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, payload = post(srv.url, COMP, {"model": "minilm", "prompt": "a"}, headers)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="minilm", prompt="a", max_tokens=3).choices[0].text is not None
        assert srv.health()["auth"] is True           # /health and the page stay public
    finally:
        srv.close()


def test_non_loopback_host_without_a_key_is_refused(kit, capsys, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MINILM_API_KEY", raising=False)
    rc = serve_main(["--ckpt", str(kit.ckpt), "--tokenizer", str(kit.tokenizer_path), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "MINILM_API_KEY" in err and "--allow-no-key" in err


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.2", "::", "example.com"]))


def test_serve_config_from_params_and_flags(tmp_path):
    from minilm.serve.main import serve_config, serve_parser

    params = tmp_path / "params.yaml"
    params.write_text("serve:\n  port: 9001\n  max_batch: 4\n", encoding="utf-8")
    args = serve_parser().parse_args(["--ckpt", "c", "--tokenizer", "t", "--params", str(params),
                                      "--max-batch", "8"])
    cfg = serve_config(args)
    assert (cfg.port, cfg.max_batch, cfg.host) == (9001, 8, "127.0.0.1")
    params.write_text("serve:\n  prot: 9001\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'port'"):
        serve_config(args)
    with pytest.raises(ConfigError, match="default_max_tokens"):
        build(ServeConfig, {"max_tokens": 10, "default_max_tokens": 20}, "serve")


def test_serve_help(capsys):
    assert serve_main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--tokenizer", "--host", "--port", "--max-batch", "--api-key-env", "--params",
                 "--template", "--precision"):
        assert flag in out


# --------------------------------------------------------------------------------------------------
# the engine in-process


def test_engine_admits_requests_mid_decode_and_matches_generate(kit, one_thread):  # noqa: F811
    # minimum lengths keep the rows in flight long enough to overlap (the model answers briefly)
    cfgs = [served_defaults(temperature=0.0, max_new_tokens=n, min_new_tokens=n) for n in (30, 12, 20)]
    cfgs.append(served_defaults(temperature=0.8, seed=3, max_new_tokens=16, min_new_tokens=4, stop=["."]))
    prompts = ["A list", "What is a dict? A dict maps keys", "x", "The file is"]
    texts: dict[int, list] = {}
    eng = Engine(kit.model, kit.tokenizer, max_batch=8)

    def submit(i: int) -> None:
        eng.submit(Request(kit.tokenizer.encode(prompts[i], bos=True), cfgs[i],
                           lambda ev, i=i: texts.setdefault(i, []).append(ev)))

    submit(0)
    submit(1)
    assert eng.admit()
    for _ in range(5):
        eng.step()                     # two rows in flight, five tokens in
    submit(2)
    submit(3)
    eng.run()
    for i, (p, cfg) in enumerate(zip(prompts, cfgs)):
        want = generate(kit.model, kit.tokenizer, [p], cfg)[0]
        events = texts[i]
        assert events[-1].kind == "done" and events[-1].text == want
        assert "".join(e.text for e in events[:-1]) == want
    sizes = eng.snapshot()["decode_batch_sizes"]
    assert sizes.get("4", 0) > 0 and sizes.get("2", 0) >= 5, sizes


def test_engine_drops_a_cancelled_request(kit):  # noqa: F811
    events: list = []
    eng = Engine(kit.model, kit.tokenizer, max_batch=4)
    cfg = served_defaults(temperature=0.0, max_new_tokens=50, min_new_tokens=50)
    req = eng.submit(Request(kit.tokenizer.encode("A", bos=True), cfg, events.append))
    other = eng.submit(Request(kit.tokenizer.encode("The", bos=True), cfg, lambda ev: None))
    assert eng.admit()
    for _ in range(3):
        eng.step()
    req.cancel()
    eng.step()
    assert events[-1].kind == "done" and events[-1].finish_reason == "cancelled"
    assert [r.req for r in eng.rows] == [other]
    eng.run()
    assert eng.snapshot()["finish_reasons"] == {"cancelled": 1, "length": 1}


def test_text_stream_holds_back_a_possible_stop_string():
    pieces = ["Hello", " wor", "ld ##", "# Ins", "truction: more"]
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["### Instruction:"])
    out = [stream.push(list(range(n))) for n in range(1, 6)]
    assert out == [("Hello", False), (" wor", False), ("ld ", False), ("", False), ("", True)]
    assert stream.final(list(range(5))) == ("", "Hello world ")


def test_serving_benchmark_row_runs_and_both_servers_agree(monkeypatch):
    """benchmarks row 7 end to end at toy size (two real servers, 1/4/16 clients); no timing asserted."""
    import math

    from benchmarks import serving
    from benchmarks.harness import Context

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    row = serving.run(Context(quick=True, repeats=1, warmup=1, min_seconds=0.0, compile=False,
                              log=lambda msg: None))
    assert [(ln["clients"], ln["metric"]) for ln in row["lines"]] == [
        (c, m) for c in serving.CLIENTS for m in ("requests/s", "tokens/s")]
    for ln in row["lines"]:
        assert math.isfinite(ln["minilm"]) and math.isfinite(ln["baseline"]) and ln["ratio"] > 0
        assert ln["same_text_as_serial"] == 1.0, ln
