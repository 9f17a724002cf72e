"""`salachat serve` against real clients: the official openai package, simonw's llm CLI and salachat.remote,
talking to real server subprocesses on free loopback ports with the default model."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "salachat", "serve"]
KEY = "sk-test-7f3a"
DOCUMENTS = ("The lighthouse on Skerry Point was kept by Ada Quill from 1871 to 1903. "
             "Her brother Tomas ran the ferry to the mainland. The lamp burned whale oil until 1880, then kerosene.")
LONG_ANSWER = "Count from 1 to 400, one number per line."


def with_documents(question: str) -> str:
    return f"<documents>\n{DOCUMENTS}\n</documents>\n\n{question}"


class Server:
    """A `salachat serve` subprocess on a free port (--port 0: the port it prints)."""

    def __init__(self, home: Path, model: Path, *args: str):
        env = {**os.environ, "SALACHAT_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
        self.proc = subprocess.Popen([*SERVE, "--model", str(model), "--port", "0", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.home, self.log, self.url = home, [], None
        deadline = time.monotonic() + 180
        for line in self.proc.stderr:
            self.log.append(line)
            if " at http://" in line:
                self.url = line.split(" at ")[1].split()[0]
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.stop()
            pytest.fail("salachat serve did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.model = str(model)

    def client(self, **kwargs) -> "openai.OpenAI":
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("timeout", 300)
        return openai.OpenAI(base_url=self.url, max_retries=0, **kwargs)

    def health(self, **headers) -> dict:
        return httpx.get(self.url.removesuffix("/v1") + "/health", headers=headers, timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("serve-home"), smollm2_path)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_server(smollm2_path, tmp_path_factory):
    """A second server, with an API key and room for one waiting request."""
    running = Server(tmp_path_factory.mktemp("serve-keyed-home"), smollm2_path, "--api-key", KEY, "--queue", "1")
    yield running
    running.stop()


def test_streamed_and_whole_answers_are_the_same_greedy_answer(server):
    client = server.client()
    messages = [{"role": "user", "content": with_documents("Who kept the lighthouse?")}]
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 40
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text.strip()
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one piece
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # the same request again starts from the documents' reading kept by the first
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    stop = " " + text.split()[2]
    cut = client.chat.completions.create(model=server.model, messages=messages, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_second_turn_continues_from_the_state_of_the_first(server):
    client = server.client()
    first_messages = [{"role": "system", "content": "Answer in one short sentence."},
                      {"role": "user", "content": with_documents("Who ran the ferry?")}]
    first = client.chat.completions.create(model=server.model, messages=first_messages, max_tokens=16)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a system prompt this server never read
    answer = first.choices[0].message.content
    follow_up = [*first_messages, {"role": "assistant", "content": answer},
                 {"role": "user", "content": "And who kept the light?"}]
    second = client.chat.completions.create(model=server.model, messages=follow_up, max_tokens=16)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # everything the first turn read and wrote was reused; only the new question was read
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert 0 < second.usage.prompt_tokens - cached < 30
    assert second.usage.model_extra["salachat"] == {"state": "memory"}


def test_a_document_sent_as_the_system_prompt_is_read_once(server):
    system = "Answer from these notes.\n\n" + "\n".join([DOCUMENTS] * 15)  # 2,600 characters, no block
    client = server.client()
    first = client.chat.completions.create(model=server.model, max_tokens=4, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "Who ran the ferry?"}])
    second = client.chat.completions.create(model=server.model, max_tokens=4, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "What did the lamp burn?"}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0.9 * first.usage.prompt_tokens


def test_a_branch_from_kept_documents_answers_as_a_fresh_reading_does(server, keyed_server):
    first = [{"role": "user", "content": with_documents("When did the lamp change fuel?")}]
    server.client().chat.completions.create(model=server.model, messages=first, max_tokens=8)
    other = [{"role": "user", "content": with_documents("What did the lamp burn at first?")}]
    reused = server.client().chat.completions.create(model=server.model, messages=other, max_tokens=20)
    fresh = keyed_server.client(api_key=KEY).chat.completions.create(model=keyed_server.model, messages=other,
                                                                    max_tokens=20)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert reused.usage.prompt_tokens_details.cached_tokens > 40  # the documents were not read again
    assert reused.usage.prompt_tokens == fresh.usage.prompt_tokens
    assert reused.choices[0].message.content == fresh.choices[0].message.content


def test_an_api_key_is_required_by_every_route(keyed_server):
    base = keyed_server.url.removesuffix("/v1")
    for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/chat/completions")]:
        response = httpx.request(method, base + path, json={}, timeout=10)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="sk-wrong").models.list()
    listed = keyed_server.client(api_key=KEY).models.list()
    assert keyed_server.model in [m.id for m in listed.data]


def test_bad_requests_get_openai_errors_naming_the_problem(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=server.model, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert "last message must be the user's" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                       temperature=7)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "not served here" in caught.value.body["message"] and caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="session:no-such-session", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-session" in caught.value.body["message"]
    raw = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert "not JSON" in raw.json()["error"]["message"]
    nowhere = httpx.get(server.url + "/completions", timeout=10)
    assert nowhere.status_code == 404 and "/v1/chat/completions" in nowhere.json()["error"]["message"]
    assert "Traceback" not in "".join(server.log)
    assert server.health()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_the_model(server):
    before = server.health()["cancelled"]
    stream = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": LONG_ANSWER}], max_tokens=2000, stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["cancelled"] == before + 1  # stopped between tokens, not after 2000 of them
    started = time.monotonic()
    quick = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Say yes."}], max_tokens=3)
    assert quick.choices[0].message.content is not None
    assert time.monotonic() - started < 20
    assert not server.health()["busy"]


def test_twenty_concurrent_clients_wait_in_turn_and_are_all_answered(server):
    served_before = server.health()["served"]
    client = server.client(timeout=900)  # the last waits for the 19 before it
    questions = [f"Question {i}: who kept the light in {1871 + i}?" for i in range(20)]
    answers: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            answers[i] = client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": with_documents(questions[i])}],
                max_tokens=3)
        except openai.OpenAIError as e:  # reported below, with the others
            answers[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    failures = {i: a for i, a in answers.items() if isinstance(a, Exception)}
    assert not failures and len(answers) == 20
    assert all(a.usage.completion_tokens >= 1 for a in answers.values())
    assert server.health()["served"] == served_before + 20


def test_past_the_queue_bound_the_server_answers_429(keyed_server):
    client = keyed_server.client(api_key=KEY)
    key = {"Authorization": f"Bearer {KEY}"}
    busy = client.chat.completions.create(model=keyed_server.model, stream=True, max_tokens=1000,
                                          messages=[{"role": "user", "content": LONG_ANSWER}])
    next(c for c in busy if c.choices and c.choices[0].delta.content)  # the model is on it now
    waiting: dict = {}
    waiter = threading.Thread(target=lambda: waiting.setdefault("answer", client.chat.completions.create(
        model=keyed_server.model, messages=[{"role": "user", "content": "Say no."}], max_tokens=3)))
    waiter.start()
    deadline = time.monotonic() + 10
    while keyed_server.health(**key)["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=keyed_server.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3)
    assert "busy" in caught.value.body["message"] and caught.value.body["code"] == "queue_full"
    busy.close()  # frees the model for the one that waited
    waiter.join(timeout=60)
    assert waiting["answer"].choices[0].message.content is not None


def test_a_saved_session_is_served_without_reading_it_again(server, tmp_path):
    document = tmp_path / "skerry.txt"
    document.write_text(DOCUMENTS + "\n", encoding="utf-8")
    env = {**os.environ, "SALACHAT_HOME": str(server.home)}
    saved = subprocess.run([sys.executable, "-m", "salachat", "ask", str(document), "Who kept the light?",
                            "--session", "skerry", "--model", server.model, "--max-tokens", "8", "--json"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert saved.returncode == 0, saved.stderr
    manifest = server.home / "sessions" / "skerry" / "manifest.json"
    before = manifest.read_bytes()
    saved_tokens = json.loads(before)["tokens"]
    client = server.client()
    assert "session:skerry" in [m.id for m in client.models.list().data]
    for question in ["What did the lamp burn at first?", "Who ran the ferry?"]:
        answer = client.chat.completions.create(model="session:skerry", max_tokens=8,
                                                messages=[{"role": "user", "content": question}])
        assert answer.usage.prompt_tokens_details.cached_tokens == saved_tokens
        assert answer.usage.model_extra["salachat"] == {"state": "session:skerry"}
        assert 0 < answer.usage.prompt_tokens - saved_tokens < 30  # only the question was read
    resumed = salachat("resume", "skerry", "Who kept the light?", "--engine", server.url, "--max-tokens", "8",
                       "--json", home=tmp_path / "client-home")  # the session is the server's, not the client's
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["answer"].strip()
    assert manifest.read_bytes() == before  # served read-only


def test_llm_cli_answers_through_the_server(server, tmp_path):
    llm = Path(sys.executable).parent / "llm"
    if not llm.exists():
        pytest.skip("the llm CLI is not installed (test extras)")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: salachat-local\n  model_name: {json.dumps(server.model)}\n  api_base: \"{server.url}\"\n",
        encoding="utf-8")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "unused"}
    result = subprocess.run([str(llm), "-m", "salachat-local", "--no-log", "-o", "max_tokens", "12",
                             with_documents("Who ran the ferry?")], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def salachat(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SALACHAT_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "salachat", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)


def test_ask_and_resume_with_engine_use_the_server(server, tmp_path):
    from salachat.chat import read_documents

    document = tmp_path / "skerry.txt"
    document.write_text(DOCUMENTS + "\n", encoding="utf-8")
    home = tmp_path / "client-home"  # the client has no model: the server runs it
    asked = salachat("ask", "--engine", server.url, str(document), "Who ran the ferry?", "--max-tokens", "8",
                     "--json", home=home)
    assert asked.returncode == 0, asked.stderr
    result = json.loads(asked.stdout)
    assert result["answer"].strip() and result["prompt_tokens"] > 40 and result["generated_tokens"] >= 1
    # the server kept what the CLI sent it read: another question about the same document starts there
    sent = read_documents([document]).prompt_text
    again = server.client().chat.completions.create(model=server.model, max_tokens=4, messages=[
        {"role": "user", "content": f"<documents>\n{sent}\n</documents>\n\nWhat did the lamp burn?"}])
    assert again.usage.prompt_tokens_details.cached_tokens > 40
    missing = salachat("resume", "no-such-session", "Who?", "--engine", server.url, home=home)
    assert missing.returncode == 5 and "no-such-session" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    unreachable = salachat("ask", "--engine", "http://127.0.0.1:9", str(document), "Who?", home=home)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_chat_window_with_engine_answers_through_the_server(server, tmp_path):
    """`salachat chat --engine URL`: the window reads nothing itself; the server answers, as it would any
    client sending the same documents and question."""
    import asyncio

    from salachat.chat import read_documents
    from salachat.tui.app import Answer, Options, SalaChat

    document = tmp_path / "skerry.txt"
    document.write_text(DOCUMENTS + "\n", encoding="utf-8")
    question = "Who ran the ferry?"

    async def chat() -> tuple[str, str]:
        app = SalaChat(Options(paths=[document], max_tokens=8, engine=server.url))
        async with app.run_test(size=(110, 32)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            await pilot.click("#question")
            await pilot.press(*question)
            await pilot.press("enter")
            deadline = asyncio.get_running_loop().time() + 120
            while not any(w.has_class("answer") for w in app.query(Answer)) or app.busy:
                assert asyncio.get_running_loop().time() < deadline, "no answer from the server"
                await pilot.pause(0.05)
            await app.workers.wait_for_complete()
            await pilot.pause()
            shown = [w.source for w in app.query(Answer) if w.has_class("answer")][-1]
            return shown, str(app.query_one("#status").render())

    shown, status = asyncio.run(chat())
    sent = read_documents([document]).prompt_text
    direct = server.client().chat.completions.create(model=server.model, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": f"<documents>\n{sent}\n</documents>\n\n{question}"}])
    assert shown.strip() and shown == direct.choices[0].message.content
    assert direct.usage.prompt_tokens_details.cached_tokens > 40  # the window's request left its reading kept
    assert "answered" in status


def test_remote_session_asks_through_the_server_and_reuses_its_reading(server):
    from salachat.engine.generate import Sampling, Stats

    from salachat.remote import RemoteSession

    remote = RemoteSession(server.url.removesuffix("/v1"), documents_text=DOCUMENTS)
    stats = Stats()
    first = "".join(remote.ask("Who ran the ferry?", Sampling(max_tokens=12), stats=stats))
    direct = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": with_documents("Who ran the ferry?")}],
        max_tokens=12)
    assert first == direct.choices[0].message.content and first.strip()
    assert stats.prompt_tokens == direct.usage.prompt_tokens and stats.generated_tokens >= 1
    assert stats.first_token_seconds > 0
    again = Stats()
    "".join(remote.ask("And who kept the light?", Sampling(max_tokens=8), stats=again))
    assert again.extra["cached_tokens"] >= stats.prompt_tokens  # the server continued the first exchange
    assert [t.question for t in remote.turns] == ["Who ran the ferry?", "And who kept the light?"]


def test_remote_errors_are_one_line_with_an_exit_code(server, keyed_server):
    from salachat import errors
    from salachat.remote import RemoteError, RemoteSession

    with pytest.raises(RemoteError) as caught:
        list(RemoteSession(keyed_server.url, api_key="sk-wrong").ask("hi"))
    assert caught.value.code == errors.USAGE and "401" in str(caught.value)
    with pytest.raises(RemoteError) as caught:
        list(RemoteSession.resume(server.url, "missing").ask("hi"))
    assert caught.value.code == errors.NO_SESSION
    with pytest.raises(RemoteError) as caught:
        list(RemoteSession("http://127.0.0.1:9", model="x").ask("hi"))
    assert caught.value.code == errors.FAILED and "cannot reach" in str(caught.value)
