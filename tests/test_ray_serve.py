"""`idefics2 serve`'s app on Ray Serve (idefics2.integrations.ray), on a local Ray cluster started once for
the module: two replicas of the built-in model behind Ray Serve's HTTP proxy give the same answers as one
`idefics2 serve` (plain, streamed, TGI), both replicas answer, and a replica killed in the middle of a load
leaves the other answering, with no request left hanging."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray.serve")

from idefics2 import pipeline  # noqa: E402
from idefics2.integrations.ray import REPLICA_HEADER, ReplicaSpec, serve_application  # noqa: E402
from idefics2.server import ServerSettings, create_app  # noqa: E402
from idefics2.server.process import free_port  # noqa: E402
from idefics2.serving import Engine  # noqa: E402
from server_utils import data_url, image_message, serving  # noqa: E402

QUESTIONS = ["What color is the circle?", "What shape is green?", "How many shapes are there?",
             "Describe the image."]  # fmt: skip
SETTINGS = ServerSettings(model_name="builtin")


@pytest.fixture(scope="module")
def ray_front():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = ReplicaSpec(engine={"max_batch": 4}, settings=SETTINGS)
        serve.run(serve_application(spec, num_replicas=2), name="idefics2", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def one_server():
    chat = pipeline()
    with serving(create_app(Engine(chat.model, chat.processor, max_batch=4), SETTINGS)) as base:
        yield base


def post(base: str, path: str, body: dict, timeout: float = 60) -> tuple[int, bytes, str | None]:
    """(status, body, the replica that answered) of a POST; errors are answers too."""
    request = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get(REPLICA_HEADER)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get(REPLICA_HEADER)


def test_same_answers_as_one_server_plain_streamed_and_tgi(ray_front, one_server):
    from openai import OpenAI

    def answers(base: str) -> list:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        out = []
        for question in QUESTIONS:
            reply = client.chat.completions.create(
                model="builtin", messages=image_message(question), max_tokens=12
            )
            messages = image_message(question)
            usage = {"include_usage": True}
            stream = client.chat.completions.create(
                model="builtin", messages=messages, max_tokens=12, stream=True, stream_options=usage
            )
            chunks = list(stream)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            prompt = f"User:![]({data_url()}){question}<end_of_utterance>\nAssistant:"
            tgi = json.loads(
                post(base, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 12}})[1]
            )
            out.append((reply.choices[0].message.content, reply.choices[0].finish_reason,
                        reply.usage.model_dump(), streamed, chunks[-1].usage.model_dump(), tgi))  # fmt: skip
        return out

    expected = answers(one_server)
    assert expected[0][0] == "green"  # the built-in model knows its shapes
    assert answers(ray_front) == expected


def test_both_replicas_answer(ray_front):
    body = {"messages": image_message(QUESTIONS[0]), "max_tokens": 4}
    replicas: list[str | None] = []

    def client() -> None:
        for _ in range(4):
            status, answer, replica = post(ray_front, "/v1/chat/completions", body)
            assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == "green"
            replicas.append(replica)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(replicas) == 24 and None not in replicas
    assert len(set(replicas)) == 2, replicas


def test_a_replica_killed_under_load_leaves_the_other_answering(ray_front):
    import ray

    body = {"messages": image_message(QUESTIONS[0]), "max_tokens": 4}
    outcomes: list[
        tuple[float, int, str | None]
    ] = []  # (when it ended, status or 0 for a hang/reset, replica)
    no_answers: list[str] = []  # what each request without an HTTP answer got instead
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, _, replica = post(ray_front, "/v1/chat/completions", body, timeout=30)
            except (TimeoutError, OSError) as error:  # a hang past 30 s, or a connection dropped unanswered
                status, replica = 0, None
                no_answers.append(f"{type(error).__name__}: {error}")
            outcomes.append((time.monotonic(), status, replica))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not any(status == 200 for _, status, _ in outcomes) and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = next(replica for _, status, replica in outcomes if status == 200)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    assert len(names) == 1, names
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)  # nobody hangs
    after = [(status, replica) for when, status, replica in outcomes if when > killed_at + 2]
    assert 0 not in [status for _, status, _ in outcomes], no_answers  # every request got an HTTP answer
    assert all(status in (200, 500, 502, 503) for _, status, _ in outcomes)
    # the other replica goes on answering
    assert sum(status == 200 for status, _ in after) >= 5
    assert {replica for status, replica in after if status == 200} - {victim}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "2", "--autoscaling-config", '{"max_replicas": 2}'], "exclude each other"),
        (["--autoscaling-config", "{max"], "not valid JSON"),
        (["--autoscaling-config", '{"min_replicas": 3, "max_replicas": 1}'], "--autoscaling-config: "),
        (["--device", "cuda"], "needs --gpus-per-replica"),
    ],
)
def test_bad_ray_flags_are_one_line_and_exit_2(capsys, flags, message):
    from idefics2.cli import main

    assert main(["serve", "--ray", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idefics2 serve: error: ") and message in err and err.count("\n") == 1


def test_app_builder_names_unknown_arguments():
    from idefics2.integrations.ray import app_builder

    with pytest.raises(ValueError, match="unknown argument.* modle; known: adapter, api_key"):
        app_builder({"modle": "HuggingFaceM4/idefics2-8b"})
