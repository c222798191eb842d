"""End to end against a real `dagster dev -w workspace.yaml`: empty VISMEM_HOME and DAGSTER_HOME,
a set copied into the inbox and marked ready, then nothing else. The sensors (run by the daemon
inside `dagster dev`) ingest and embed it, then fold it into the live index and evaluate it. The
results are read back over GraphQL, a run is launched over GraphQL, and a headless Chromium
clicks "Materialize" in the UI.

One server serves the module; it runs in its own process group and is always stopped.
Its output is kept in test-artifacts/dagster-dev.log, the UI screenshots next to it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vismem_assets.memory import Memory

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
SET_NAME = "e2e-set"
LABELS = 3
PER_LABEL = 4
STARTUP_S = 120
PIPELINE_S = 240
RUN_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dagster:
    """A running `dagster dev` and a small GraphQL client for it."""

    def __init__(self, proc: subprocess.Popen, port: int, home: Path, log: Path):
        self.proc, self.port, self.home, self.log = proc, port, home, log
        self.url = f"http://127.0.0.1:{port}"
        self.location = None  # code location name, found once loaded

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def gql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
        assert not answer.get("errors"), f"GraphQL errors: {answer['errors']}"
        return answer["data"]

    def alive(self):
        if self.proc.poll() is not None:
            pytest.fail(f"`dagster dev` exited with {self.proc.returncode}:\n{self.log_tail()}")


def wait_for(what: str, probe, timeout: float, server: Dagster | None = None, every: float = 1.0):
    """Call probe() until it returns something truthy; fail with the server's log after timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if server is not None:
            server.alive()
        try:
            value = probe()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last_error = e
        time.sleep(every)
    tail = f"\n--- dagster dev log ---\n{server.log_tail()}" if server is not None else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error}){tail}")


def stop(proc: subprocess.Popen):
    """SIGTERM the whole process group, wait, then SIGKILL whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    # Children (webserver, daemon, code server, run workers) share the group: make sure of them.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if not any(p.is_dir() and live_in_group(p, proc.pid) for p in Path("/proc").glob("[0-9]*")):
            break
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def live_in_group(proc_dir: Path, pgid: int) -> bool:
    """Is this /proc entry a not-yet-dead process of process group pgid?"""
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] != "Z" and int(fields[2]) == pgid


LOCATIONS = """{ workspaceOrError { __typename
  ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename
      ... on RepositoryLocation { name repositories { name jobs { name } } }
      ... on PythonError { message stack } } } }
  ... on PythonError { message } } }"""


@pytest.fixture(scope="module")
def dagster(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    home, dagster_home = root / "vismem_home", root / "dagster_home"
    home.mkdir()
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster_project" / "dagster.yaml", dagster_home / "dagster.yaml")
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "dagster-dev.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "VISMEM_"))}
    env.update(VISMEM_HOME=str(home), DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1",
               NO_COLOR="1", DAGSTER_DISABLE_TELEMETRY="1",
               VISMEM_SCHEDULES="0")  # no 03:00 or 05:00 run halfway through a test
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "dagster"), "dev", "-w", "workspace.yaml",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = Dagster(proc, port, home, log)
    try:
        wait_for("the webserver to answer /server_info",
                 lambda: urllib.request.urlopen(f"{server.url}/server_info", timeout=5).status == 200,
                 STARTUP_S, server)

        def loaded():
            workspace = server.gql(LOCATIONS)["workspaceOrError"]
            assert workspace["__typename"] == "Workspace", workspace
            for entry in workspace["locationEntries"]:
                location = entry["locationOrLoadError"]
                if location and location["__typename"] == "PythonError":
                    pytest.fail(f"code location {entry['name']} failed to load:\n{location['message']}"
                                f"\n{''.join(location['stack'])}")
                if entry["loadStatus"] == "LOADED" and location:
                    return location
            return None

        location = wait_for("the code location to load", loaded, STARTUP_S, server)
        server.location = location["name"]
        (repository,) = location["repositories"]
        server.repository = repository["name"]
        server.jobs = {job["name"] for job in repository["jobs"]}
        yield server
    finally:
        stop(proc)


def drop_set(home: Path, source: Path, name: str) -> Path:
    """Copy a few images per label into the inbox as a user would; _READY goes in last."""
    target = home / "inbox" / "sets" / name
    labels = sorted(d.name for d in source.iterdir() if d.is_dir())[:LABELS]
    for label in labels:
        (target / label).mkdir(parents=True)
        for f in sorted((source / label).glob("*.png"))[:PER_LABEL]:
            shutil.copy(f, target / label / f.name)
    (target / "_READY").touch()
    return target


MATERIALIZATIONS = """query($key: AssetKeyInput!, $partitions: [String!], $limit: Int) {
  assetOrError(assetKey: $key) { __typename
    ... on Asset { assetMaterializations(partitions: $partitions, limit: $limit) {
      runId partition timestamp
      metadataEntries { __typename label
        ... on FloatMetadataEntry { floatValue }
        ... on IntMetadataEntry { intValue }
        ... on TextMetadataEntry { text }
        ... on BoolMetadataEntry { boolValue }
        ... on PathMetadataEntry { path }
        ... on MarkdownMetadataEntry { mdStr } } } } } }"""

RUN = """query($id: ID!) { runOrError(runId: $id) { __typename
  ... on Run { runId jobName status tags { key value } assetSelection { path } }
  ... on PythonError { message } } }"""

CHECKS = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) {
  ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks { name
    executionForLatestMaterialization { runId status } } } } } } }"""

LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId status } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on PythonError { message stack }
  ... on Error { message } } }"""

RUNS = """query($filter: RunsFilter) { runsOrError(filter: $filter, limit: 20) {
  ... on Runs { results { runId jobName status creationTime assetSelection { path } tags { key value } } } } }"""


def materializations(server: Dagster, key: str, partitions=None, limit=5) -> list[dict]:
    asset = server.gql(MATERIALIZATIONS, {"key": {"path": [key]}, "partitions": partitions,
                                          "limit": limit})["assetOrError"]
    return asset["assetMaterializations"] if asset["__typename"] == "Asset" else []


def values(materialization: dict) -> dict:
    """label -> the entry's value, for the plain kinds of metadata."""
    out = {}
    for e in materialization["metadataEntries"]:
        out[e["label"]] = next((e[k] for k in ("floatValue", "intValue", "text", "boolValue", "path", "mdStr")
                                if k in e), e["__typename"])
    return out


def run(server: Dagster, run_id: str) -> dict:
    answer = server.gql(RUN, {"id": run_id})["runOrError"]
    assert answer["__typename"] == "Run", answer
    answer["tags"] = {t["key"]: t["value"] for t in answer["tags"]}
    return answer


def wait_for_run(server: Dagster, run_id: str, timeout: float = RUN_S) -> dict:
    def finished():
        r = run(server, run_id)
        return r if r["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

    result = wait_for(f"run {run_id} to finish", finished, timeout, server)
    assert result["status"] == "SUCCESS", f"run {run_id} ended {result['status']}:\n{server.log_tail()}"
    return result


def checks(server: Dagster, key: str) -> dict:
    node = server.gql(CHECKS, {"key": {"path": [key]}})["assetNodeOrError"]
    return {c["name"]: c["executionForLatestMaterialization"] for c in node["assetChecksOrError"]["checks"]}


def tracebacks(server: Dagster) -> list[str]:
    text = server.log.read_text(errors="replace")
    return [m.group(0) for m in re.finditer(r"Traceback \(most recent call last\):(?:\n[ \t].*)*\n.*", text)]


@pytest.fixture(scope="module")
def arrived(dagster, fm_sets):
    """Drop a set into the inbox and wait, doing nothing else, until the sensors have carried it
    through the whole graph. Returns the runs and materializations that did it."""
    drop_set(dagster.home, fm_sets["train"], SET_NAME)

    def ingested():
        both = [materializations(dagster, key, [SET_NAME], 1) for key in ("image_sets", "embeddings")]
        return all(both) and [found[0] for found in both]

    image_set, embedding = wait_for("the image_set_sensor's run to ingest and embed the set",
                                    ingested, PIPELINE_S, dagster, every=2)

    def evaluated():
        both = [materializations(dagster, key, None, 1) for key in ("memory_index", "evaluation")]
        return all(both) and [found[0] for found in both]

    index, evaluation = wait_for("the embeddings_sensor's run to index and evaluate",
                                 evaluated, PIPELINE_S, dagster, every=2)
    return {"image_sets": image_set, "embeddings": embedding, "memory_index": index, "evaluation": evaluation}


@pytest.mark.slow
def test_inbox_to_evaluation_with_no_other_action_then_launch_over_graphql(dagster, arrived, encoder):
    assert {"ingest_image_set", "refresh_memory", "__ASSET_JOB"} <= dagster.jobs
    assert dagster.location == "vismem"  # workspace.yaml's location_name

    # The set was taken by the inbox sensor, ingested and embedded in one run.
    image_set = values(arrived["image_sets"])
    assert arrived["image_sets"]["partition"] == SET_NAME
    assert image_set["files"] == image_set["added"] == LABELS * PER_LABEL
    assert image_set["quarantined"] == 0
    ingest_run = run(dagster, arrived["image_sets"]["runId"])
    assert ingest_run["jobName"] == "ingest_image_set"
    assert ingest_run["tags"]["dagster/sensor_name"] == "image_set_sensor"
    assert ingest_run["tags"]["dagster/partition"] == SET_NAME
    assert arrived["embeddings"]["runId"] == ingest_run["runId"]
    assert values(arrived["embeddings"])["embedded"] == LABELS * PER_LABEL

    # The embeddings sensor then folded it into the live index and evaluated it.
    refresh_run = wait_for_run(dagster, arrived["evaluation"]["runId"])
    assert refresh_run["jobName"] == "refresh_memory"
    assert refresh_run["tags"]["dagster/sensor_name"] == "embeddings_sensor"
    assert arrived["memory_index"]["runId"] == refresh_run["runId"]
    index = values(arrived["memory_index"])
    assert index["index_version"] == "1" and index["operation"] == "add" and index["new_version"] is True
    assert index["n_vectors"] == LABELS * PER_LABEL
    assert re.fullmatch(r"[0-9a-f]{64}", index["sha256"])
    evaluation = values(arrived["evaluation"])
    assert evaluation["index_version"] == index["index_version"]
    assert evaluation["query_set"] == "leave-one-out"
    assert evaluation["n_queries"] == LABELS * PER_LABEL
    assert 0.0 <= evaluation["top1_rank_k20"] <= 1.0 and 0.0 <= evaluation["best_top1"] <= 1.0
    assert evaluation["top1_rank_k20"] > 1 / LABELS  # three very different Fashion-MNIST classes: far above chance
    # The blocking checks on the index and the evaluation's check ran with that run, and passed
    # (as did any other check the code location defines on these assets).
    for key, expected in (("memory_index", {"live_index_matches_ledger", "index_file_matches_sha256"}),
                          ("evaluation", {"top1_not_dropped"})):
        status = {name: c and c["status"] for name, c in checks(dagster, key).items()}
        assert expected <= set(status), status
        assert all(s == "SUCCEEDED" for s in status.values()), f"checks on {key}: {status}"

    # Launch a materialization of index + evaluation ourselves, as any GraphQL client would.
    params = {"selector": {"repositoryLocationName": dagster.location, "repositoryName": dagster.repository,
                           "jobName": "__ASSET_JOB",
                           "assetSelection": [{"path": ["memory_index"]}, {"path": ["evaluation"]}]},
              "mode": "default", "runConfigData": {}}
    launched = dagster.gql(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    done = wait_for_run(dagster, run_id)
    assert sorted(p["path"][0] for p in done["assetSelection"]) == ["evaluation", "memory_index"]
    (index_again,) = materializations(dagster, "memory_index", None, 1)
    (evaluation_again,) = materializations(dagster, "evaluation", None, 1)
    assert index_again["runId"] == evaluation_again["runId"] == run_id
    # Nothing new arrived: the live version stays, and the evaluation is of that same version.
    assert values(index_again)["index_version"] == index["index_version"]
    assert values(index_again)["new_version"] is False
    assert values(index_again)["n_vectors"] == LABELS * PER_LABEL
    again = values(evaluation_again)
    assert again["index_version"] == index["index_version"]
    assert again["top1_rank_k20"] == pytest.approx(evaluation["top1_rank_k20"])

    # The ledger agrees with what the runs reported.
    memory = Memory(dagster.home, encoder=encoder)
    assert memory.index_consistency()["ok"]
    live = memory.indexes.live()
    assert (str(live.version), live.n_vectors) == (index["index_version"], LABELS * PER_LABEL)
    assert len(memory.ledger.query("SELECT * FROM samples WHERE status = 'active'")) == LABELS * PER_LABEL

    assert not tracebacks(dagster), "tracebacks in test-artifacts/dagster-dev.log:\n" + "\n\n".join(tracebacks(dagster))


@pytest.mark.slow
def test_materialize_button_in_the_ui_launches_a_run_that_succeeds(browser, dagster, arrived):
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    # First visit: Dagster may ask to join its community. Dismiss it whenever it shows.
    page.add_locator_handler(page.get_by_role("dialog").filter(has_text="Join the Dagster community"),
                             lambda dialog: dialog.get_by_role("button", name="Skip").click())
    try:
        page.goto(f"{dagster.url}/assets/memory_index", wait_until="domcontentloaded")
        # The button's accessible name is "<icon name> Materialize".
        button = page.get_by_role("button", name=re.compile(r"(^|\s)Materialize$")).first
        button.wait_for(state="visible")
        page.get_by_text("n_vectors", exact=True).first.wait_for()  # the latest materialization's metadata
        page.get_by_text("The live FAISS index", exact=False).first.wait_for()
        page.screenshot(path=ARTIFACTS / "ui-asset-page.png")

        before = {r["runId"] for r in dagster.gql(RUNS)["runsOrError"]["results"]}
        button.click()

        def launched():
            for r in dagster.gql(RUNS)["runsOrError"]["results"]:
                if r["runId"] not in before and r["jobName"] == "__ASSET_JOB":
                    return r
            # A launchpad or confirmation dialog, if this Dagster shows one: confirm it.
            confirm = page.get_by_role("dialog").get_by_role(
                "button", name=re.compile(r"(^|\s)(Materialize|Launch run|Confirm)$"))
            if confirm.count() and confirm.first.is_visible():
                confirm.first.click()
            return None

        new_run = wait_for("the UI's Materialize to launch a run", launched, 60, dagster)
        assert [p["path"] for p in new_run["assetSelection"]] == [["memory_index"]]
        assert {t["key"]: t["value"] for t in new_run["tags"]}.get("dagster/from_ui") == "true"
        wait_for_run(dagster, new_run["runId"])

        # The UI shows the run as succeeded.
        page.goto(f"{dagster.url}/runs/{new_run['runId']}", wait_until="domcontentloaded")
        page.get_by_text("Success", exact=True).first.wait_for()
        page.get_by_text("RUN_SUCCESS").first.wait_for()
        page.screenshot(path=ARTIFACTS / "ui-after-materialize.png")
    finally:
        context.close()

    (latest,) = materializations(dagster, "memory_index", None, 1)
    assert latest["runId"] == new_run["runId"]
    assert values(latest)["n_vectors"] == LABELS * PER_LABEL
    assert not tracebacks(dagster), "tracebacks in test-artifacts/dagster-dev.log:\n" + "\n\n".join(tracebacks(dagster))


def new_page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.add_locator_handler(page.get_by_role("dialog").filter(has_text="Join the Dagster community"),
                             lambda dialog: dialog.get_by_role("button", name="Skip").click())
    return context, page


@pytest.mark.slow
def test_evaluation_page_forget_launchpad_and_a_rejected_request_in_the_ui(browser, dagster, arrived):
    """Issue 17: what a person sees. The evaluation's page; the forget job's Launchpad, whose
    scaffold is a request to fill and whose defaults cannot be launched; a request with a typo
    refused at launch; a typo dropped in the inbox rejected by the sensor, with its error file
    and log line. Nothing of it runs, fails or re-materializes a core asset."""
    ARTIFACTS.mkdir(exist_ok=True)
    core = ("memory_index", "pruning_weights", "evaluation")
    before = {key: materializations(dagster, key, None, 1) for key in core}
    runs_before = {r["runId"] for r in dagster.gql(RUNS)["runsOrError"]["results"]}
    params = {"selector": {"repositoryLocationName": dagster.location, "repositoryName": dagster.repository,
                           "jobName": "forget"}, "mode": "default"}

    # Over GraphQL: the defaults are invalid config (who and why are required) ...
    empty = dagster.gql(LAUNCH, {"params": {**params, "runConfigData": {}}})["launchRun"]
    assert empty["__typename"] == "RunConfigValidationInvalid", empty
    assert any("requested_by" in e["message"] for e in empty["errors"])
    # ... and a typo is refused before a run exists, saying what to fix.
    typo = {"label": "Bgg", "requested_by": "dpo@example.com", "reason": "ui test"}
    try:  # the webserver answers a launch that raised with HTTP 500 and the error as its body
        dagster.gql(LAUNCH, {"params": {**params, "runConfigData": typo}})
        pytest.fail("a forget of label 'Bgg' was launched")
    except urllib.error.HTTPError as error:
        refused = json.load(error)["data"]["launchRun"]
    assert refused["__typename"] == "PythonError", refused
    assert "forget request refused (no run was created): no sample has label 'Bgg'" in refused["message"], refused
    assert "Did you mean 'Bag'?" in refused["message"]  # the set holds Ankle_boot, Bag, Coat

    # The inbox: a typo goes to rejected/ with its reason, and the sensor's log says so.
    inbox = dagster.home / "inbox" / "forget"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "typo.json").write_text(json.dumps(typo))
    error_file = inbox / "rejected" / "typo.json.error.txt"
    wait_for("the forget sensor to reject typo.json", error_file.exists, 90, dagster)
    assert error_file.read_text().startswith("no sample has label 'Bgg'")
    assert (inbox / "rejected" / "typo.json").exists() and not (inbox / "typo.json").exists()

    context, page = new_page(browser)
    try:
        page.goto(f"{dagster.url}/assets/evaluation", wait_until="domcontentloaded")
        page.get_by_text("top1_rank_k20", exact=True).first.wait_for()
        page.screenshot(path=ARTIFACTS / "ui-evaluation.png", full_page=True)

        # The Launchpad: the defaults, the errors saying what is missing, then the scaffold to fill.
        page.goto(f"{dagster.url}/locations/{dagster.location}/jobs/forget/playground", wait_until="domcontentloaded")
        page.get_by_text("Missing required config entries ['reason', 'requested_by']").first.wait_for()
        page.wait_for_timeout(500)  # let transitions end before a screenshot
        page.screenshot(path=ARTIFACTS / "ui-forget-launchpad-defaults.png")
        page.get_by_role("button", name=re.compile("Scaffold missing config")).first.click()
        page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
        page.get_by_role("dialog").wait_for(state="hidden")
        page.get_by_text("No missing config").first.wait_for()
        page.locator(".CodeMirror").get_by_text("requested_by").first.wait_for()
        page.wait_for_timeout(500)
        page.screenshot(path=ARTIFACTS / "ui-forget-launchpad.png")

        # A typo typed in and launched: refused with what to fix, before any run exists.
        page.locator(".CodeMirror").click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.type("requested_by: dpo@example.com\nreason: ui test\nlabel: Bgg\n")
        page.get_by_role("button", name=re.compile("Launch Run")).click()
        page.get_by_text("Did you mean 'Bag'?").first.wait_for()
        page.get_by_role("button", name="OK").wait_for()
        page.wait_for_timeout(1000)
        page.screenshot(path=ARTIFACTS / "ui-forget-launch-refused.png")

        # The rejected inbox file: the sensor tick's log says why.
        page.goto(f"{dagster.url}/locations/{dagster.location}/sensors/forget_request_sensor",
                  wait_until="domcontentloaded")
        logs = page.get_by_role("button", name="View logs")
        logs.first.wait_for()
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        for i in range(logs.count()):  # the newest ticks first; the one that rejected it logged it
            logs.nth(i).click()
            dialog = page.get_by_role("dialog").filter(has_text="Logs for forget_request_sensor")
            try:
                dialog.get_by_text("forget request typo.json rejected: no sample has label 'Bgg'").wait_for(timeout=5_000)
            except PlaywrightTimeout:
                dialog.get_by_role("button", name="Done").click()
                continue
            page.wait_for_timeout(500)
            page.screenshot(path=ARTIFACTS / "ui-forget-rejected.png")
            break
        else:
            pytest.fail("no tick of forget_request_sensor logs the rejection of typo.json")
    finally:
        context.close()

    # Nothing ran, failed or re-materialized.
    after_runs = dagster.gql(RUNS)["runsOrError"]["results"]
    assert not [r for r in after_runs if r["runId"] not in runs_before and r["jobName"] == "forget"]
    assert not [r for r in after_runs if r["status"] == "FAILURE"]
    assert {key: materializations(dagster, key, None, 1) for key in core} == before
    assert not tracebacks(dagster), "tracebacks in test-artifacts/dagster-dev.log:\n" + "\n\n".join(tracebacks(dagster))
