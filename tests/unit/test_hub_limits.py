"""Bounded workflow loading (hub/limits.py): each stage is refused before it can cost more than the text's size
promises, with a 422-style WorkflowError naming the limit and its `fleetflow hub run` option."""

from __future__ import annotations

import asyncio
import gc
import os
import stat
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

from agent.runtime.clock import now_ms
from agent.runtime.keys import KeyFileError
from hub.api import SubmitRun, create_app, parse_submission
from hub.limits import Limits
from hub.service import Hub
from hub.workflow import WorkflowError, load_workflow, load_workflow_text, workflow_from_object

FAST_S = 1.0  # a refusal costs milliseconds; this only has to tell it from an expansion (seconds, or never)


def billion_laughs(levels: int) -> str:
    """Each level is a list of nine aliases of the level below: 10 * 9**levels strings from a few hundred bytes."""
    lines = ["name: lol", "steps:", "  - id: a", "    uses: echo", "    with:",
             "      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def refusal(text: str, limits: Limits = Limits()) -> str:
    started = time.perf_counter()
    with pytest.raises(WorkflowError) as caught:
        load_workflow_text(text, "wf.yaml", limits)
    assert time.perf_counter() - started < FAST_S
    return str(caught.value)


@pytest.mark.parametrize("levels", [6, 7, 8, 9])
def test_billion_laughs_is_refused_before_it_expands(levels: int) -> None:
    text = billion_laughs(levels)
    assert len(text) < 1000 and text.count("*") <= 100  # small, and within the alias limit: only expansion tells
    message = refusal(text)
    assert "more than 100000 nodes with aliases expanded, over the limit of 100000 (--max-workflow-nodes)" in message
    assert message.startswith("wf.yaml:")  # the line of the first anchor that expands too far


@pytest.mark.parametrize("text", [
    "name: x\nsteps: " + "[" * 5000 + "]" * 5000 + "\n",            # flow sequences
    "name: x\nsteps: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",  # flow mappings
    "name: x\nsteps:\n" + "- " * 5000 + "x\n",                      # block sequences on one line
], ids=["flow-sequences", "flow-mappings", "block-sequences"])
def test_5000_deep_nesting_is_a_workflow_error_not_a_recursion_error(text: str) -> None:
    message = refusal(text)
    assert "levels deep, over the limit of 32 (--max-workflow-depth)" in message


def test_nesting_built_from_aliases_counts_expanded() -> None:
    # 20 levels, then 20 more around an alias of the first: no single place in the text is deeper than 21.
    text = ("name: x\nsteps:\n  - id: a\n    uses: echo\n    with:\n"
            f"      p: &p {'[' * 20}1{']' * 20}\n"
            f"      q: {'[' * 20}*p{']' * 20}\n")
    assert "levels deep through aliases, over the limit of 32 (--max-workflow-depth)" in refusal(text)


def test_100k_steps_are_refused_before_validation() -> None:
    yaml_text = "name: big\nsteps: [" + ",".join(["a"] * 100_000) + "]\n"
    assert "wf.yaml:2: 100000 steps, over the limit of 1000 (--max-workflow-steps)" in refusal(yaml_text)
    started = time.perf_counter()
    with pytest.raises(WorkflowError, match=r"workflow: 100000 steps, over the limit of 1000 \(--max-workflow-steps\)"):
        workflow_from_object({"name": "big", "steps": [{"id": f"s{i}", "uses": "echo"} for i in range(100_000)]},
                             "workflow")
    assert time.perf_counter() - started < FAST_S


def test_aliases_over_the_limit_are_refused() -> None:
    text = ("name: x\nsteps:\n  - id: a\n    uses: echo\n    with:\n      v: &v 1\n"
            f"      w: [{', '.join(['*v'] * 101)}]\n")
    assert "wf.yaml:7: more than 100 aliases, over the limit of 100 (--max-workflow-aliases)" in refusal(text)


def test_a_recursive_alias_is_refused() -> None:
    assert "recursive" in refusal("name: x\nsteps: &s [*s]\n")


def test_text_over_the_size_limit_is_refused_unparsed(tmp_path: Path) -> None:
    text = "name: x\nsteps: [{id: a, uses: echo}]\n#" + "x" * (256 << 10) + "\n"
    assert "bytes of YAML, over the limit of 262144 (--max-workflow-bytes)" in refusal(text)
    path = tmp_path / "big.yaml"
    path.write_text(text)
    with pytest.raises(WorkflowError, match=r"big.yaml: \d+ bytes of YAML, over the limit"):
        load_workflow(path)


def test_workflows_with_a_few_anchors_are_accepted() -> None:
    text = """
name: anchors
steps:
  - &base {id: a, uses: echo, timeout: 5, with: &settings {level: 3, tags: [x, y]}}
  - <<: *base
    id: b
    needs: [a]
  - id: c
    uses: echo
    needs: [b]
    with: *settings
"""
    workflow = load_workflow_text(text)
    assert [(s.id, s.timeout, s.with_) for s in workflow.steps] == [
        ("a", 5.0, {"level": 3, "tags": ["x", "y"]}), ("b", 5.0, {"level": 3, "tags": ["x", "y"]}),
        ("c", 300.0, {"level": 3, "tags": ["x", "y"]})]


def test_a_chain_of_the_most_steps_allowed_validates() -> None:
    # The cycle check and the topological order were recursive: a legal 1,000-step chain raised RecursionError.
    steps = [{"id": f"s{i}", "uses": "echo", "needs": [f"s{i + 1}"]} for i in range(999)] + [{"id": "s999",
                                                                                           "uses": "echo"}]
    workflow = workflow_from_object({"name": "chain", "steps": steps})
    assert len(workflow.steps) == 1000


def test_limits_are_configurable_and_named() -> None:
    three = "name: x\nsteps:\n  - {id: a, uses: echo}\n  - {id: b, uses: echo}\n  - {id: c, uses: echo}\n"
    load_workflow_text(three)
    assert "3 steps, over the limit of 2 (--max-workflow-steps)" in refusal(three, Limits(steps=2))
    assert "over the limit of 2 (--max-workflow-depth)" in refusal(three, Limits(depth=2))
    assert "over the limit of 40 (--max-workflow-bytes)" in refusal(three, Limits(workflow_bytes=40))


def test_json_objects_and_inputs_get_the_same_limits() -> None:
    deep: dict[str, object] = {}
    inner = deep
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]  # type: ignore[assignment]
    with pytest.raises(WorkflowError, match=r"workflow: nesting 33 levels deep, over the limit of 32"):
        workflow_from_object({"name": "x", "steps": [{"id": "a", "uses": "echo", "with": deep}]}, "workflow")
    with pytest.raises(WorkflowError, match=r"inputs: nesting 33 levels deep"):
        parse_submission(SubmitRun(workflow="name: x\nsteps: [{id: a, uses: echo}]\n", inputs={"v": deep}), Limits())
    with pytest.raises(WorkflowError, match=r"workflow: more than 100000 values, over the limit of 100000"):
        workflow_from_object({"name": "x", "steps": [{"id": "a", "uses": "echo", "with": {"v": [0] * 200_000}}]},
                             "workflow")


def test_validate_command_uses_the_bounded_loader(tmp_path: Path) -> None:
    path = tmp_path / "lol.yaml"
    path.write_text(billion_laughs(9))
    done = subprocess.run([str(Path(sys.executable).parent / "fleetflow"), "validate", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "--max-workflow-nodes" in done.stderr and "Traceback" not in done.stderr


# -- the HTTP layer, in process: body limit and guarded docs --------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[httpx.AsyncClient]:
    hub = types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(request_bytes=1000), data=tmp_path),
                                check_token=lambda token: token == "secret", key=SigningKey.generate(), clock=now_ms)
    app = create_app(hub)  # type: ignore[arg-type]  # the routes used here read only these (and audit with the key)
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://hub",
                            headers={"Authorization": "Bearer secret"})


def test_request_bodies_are_bounded_with_and_without_content_length(api: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(1000):  # 1 MB, far past the 1000-byte limit; refused after the first kilobyte or so
            yield b"x" * 1000

    async def main() -> list[httpx.Response]:
        async with api:
            return [await api.post("/runs", content=b"x" * 5000),
                    await api.post("/runs", content=chunks()),  # no Content-Length: sent chunked
                    await api.post("/runs", json={"workflow": "name: x\nsteps: [{id: a, uses: echo}]\n",
                                                  "inputs": {"v": "y" * 2000}})]

    sized, chunked, json_body = asyncio.run(main())
    assert sized.status_code == chunked.status_code == json_body.status_code == 413
    assert sized.json()["detail"] == "request body: 5000 bytes, over the limit of 1000 (--max-request-bytes)"
    assert chunked.json()["detail"] == ("request body: more than 1000 bytes, over the limit of 1000 "
                                        "(--max-request-bytes)")


def test_a_submission_is_parsed_off_the_event_loop(tmp_path: Path) -> None:
    # 1,000 steps with conditions: valid, and half a second of parsing and validation.
    steps = ["  - {id: s0, uses: echo}"] + [
        f"  - {{id: s{i}, uses: echo, needs: [s{i - 1}], when: \"steps.s{i - 1}.state == 'succeeded'\", "
        f"with: {{v: {i}, w: [1, 2, 3], x: {{a: b}}}}}}" for i in range(1, 1000)]
    text = "name: big\nsteps:\n" + "\n".join(steps) + "\n"
    submitted = []

    async def submit(workflow: object, inputs: object, key: object) -> tuple[str, bool]:
        submitted.append(workflow)
        return "r-1", True

    hub = types.SimpleNamespace(config=types.SimpleNamespace(limits=Limits(), data=tmp_path),
                                check_token=lambda t: t == "s", submit=submit, key=SigningKey.generate(), clock=now_ms)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(hub)),  # type: ignore[arg-type]
                               base_url="http://hub", headers={"Authorization": "Bearer s"})

    async def main() -> tuple[httpx.Response, float, float]:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def ticker() -> None:  # what heartbeats need: the loop gets to run every few milliseconds
            last = loop.time()
            while True:
                await asyncio.sleep(0.005)
                gaps.append(loop.time() - last)
                last = loop.time()

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        started = loop.time()
        async with client:
            response = await client.post("/runs", json={"workflow": text})
        took = loop.time() - started
        await asyncio.sleep(0.05)  # the ticker records the gap it was kept waiting, if it was
        task.cancel()
        return response, took, max(gaps)

    # A full garbage collection, which any thread's allocations may start, stops every thread for up to 0.2 s on a
    # busy machine: not what is measured here (whether the handler parses on the loop), so it waits until after.
    gc.disable()
    try:
        response, took, longest_gap = asyncio.run(main())
    finally:
        gc.enable()
    assert response.status_code == 201, response.text
    assert len(submitted[0].steps) == 1000  # type: ignore[attr-defined]
    assert longest_gap < took / 3, f"the loop stood still {longest_gap:.3f} s of the {took:.3f} s the request took"


def test_docs_are_not_public_and_the_schema_needs_the_token(api: httpx.AsyncClient) -> None:
    async def main() -> dict[str, int]:
        async with api:
            out = {path: (await api.get(path, headers={"Authorization": ""})).status_code
                   for path in ("/docs", "/redoc", "/openapi.json")}
            schema = await api.get("/openapi.json")
            assert "/runs" in schema.json()["paths"]
            out["/openapi.json with token"] = schema.status_code
            return out

    assert asyncio.run(main()) == {"/docs": 404, "/redoc": 404, "/openapi.json": 401, "/openapi.json with token": 200}


# -- the API token file ----------------------------------------------------------------------------------------


def test_an_api_token_others_can_read_is_refused_like_a_key(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    token = Hub._token(path)  # made on first start, 0600
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and Hub._token(path) == token
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"api.token is accessible by other users \(mode 644\); run: chmod 600"):
        Hub._token(path)


def test_aliases_of_one_large_string_are_refused_by_their_expanded_size() -> None:
    big = "x" * 20_000
    text = f"name: big\nversion: 1.0.0\nx-blob: &b {big}\nsteps:\n" + "".join(
        f"  - id: s{i}\n    uses: echo\n    with: {{v: *b}}\n" for i in range(40))
    with pytest.raises(WorkflowError, match="characters of text with aliases expanded"):
        load_workflow_text(text, "wf.yaml")
