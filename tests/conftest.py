"""Shared fixtures, and how the suite runs in parallel (pytest-xdist; pyproject.toml's addopts: `-n auto --dist loadgroup`).

Each worker is its own process with its own Prefect home, loraflow cache, temporary folders, built model (tiny_model)
and Prefect test server (prefect_server): nothing mutable is shared between workers. A test module whose tests share a
module-scoped fixture (a first pipeline run, a real server with its pool and worker) runs whole on one worker: its
tests get an xdist_group mark named after the module (pytest_collection_modifyitems below), so that fixture is built
once; a module may also set `pytest.mark.xdist_group(name)` itself. Every other test goes to whichever worker is free.
`-n 0` (or `-p no:xdist`) runs in this process alone.
"""

import os
import tempfile
from pathlib import Path

from loraflow.process import QUIET_ENVIRONMENT  # (the standard library only: imports nothing of Prefect's)

# Before Prefect is imported anywhere: a private Prefect home (database, local results) for the
# whole test session (each xdist worker its own), so no test reads another run's cache, and no network calls.
_HOME = Path(tempfile.mkdtemp(prefix="loraflow-tests-prefect-"))
os.environ["PREFECT_HOME"] = str(_HOME)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_HOME / "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
# The Hugging Face libraries' quiet settings, which the CLI sets for itself and every process it starts, set for the
# whole session: a trainer forked by the session's fork server (trainer_fork_server) was imported with them.
os.environ.update({name: os.environ.get(name, value) for name, value in QUIET_ENVIRONMENT.items()})


def _pool_job_settings() -> dict[str, str]:
    """The oneCCL settings the xpu pool's job template gives every flow run (infra/work-pools/xpu.json, defaults), set
    for the session too: the pool's trainers then meet the fork server's import-time settings (loraflow.fork_server).
    Nothing reads them on a CPU."""
    import json

    template = json.loads((Path(__file__).resolve().parents[1] / "infra/work-pools/xpu.json").read_text())
    defaults = {name: spec.get("default") for name, spec in template["variables"]["properties"].items()}
    return {name: str(defaults[value.strip("{} ")]) for name, value in template["job_configuration"]["env"].items()
            if name.startswith("CCL_") and defaults.get(value.strip("{} ")) is not None}


os.environ.update(_pool_job_settings())
os.environ["LORAFLOW_CACHE"] = str(_HOME / "loraflow-cache")
os.environ.pop("LORAFLOW_STORE_URL", None)  # links are file:// unless a test starts a store server
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker's share of the cores, for torch's (OpenMP) threads here and in every process it starts (trainers,
    # CLI runs, servers): torch's default of one thread per core in each of the workers' processes oversubscribes the
    # cores, and OpenMP's threads then spin waiting for each other. Measured on 2 cores: two `loraflow run` at once took
    # 78 s each at the default (twice the CPU time of one alone), 36 s each with one thread; one alone 34 s either way.
    _cores = len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "loraflow" / "data" / "sample" / "alpaca_gpt4_sample.json"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "SOURCE.md").exists():
        pytest.skip(f"{SHARED_DATA} is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The small Llama-architecture model loraflow builds (random weights, BPE trained on the sample)."""
    from loraflow.data.formats import read_rows
    from loraflow.models.tiny import build_tiny_llama, sample_texts

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", sample_texts(read_rows(str(SAMPLE))))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from loraflow.data.tokenize import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(params=["0", "1"], ids=["cpu-without-bf16", "cpu-with-bf16"])
def cpu_bf16(request, monkeypatch) -> str:
    """The test runs twice: with precision auto deciding as on a CPU without AVX512-BF16/AMX (fp32) and as on one with
    them (bf16), whatever this host has (LORAFLOW_CPU_BF16, loraflow.plan.bf16_support; trainer processes inherit it).
    For the tests whose outcome follows the precision auto picks: CI on one kind of host meets what the other would."""
    monkeypatch.setenv("LORAFLOW_CPU_BF16", request.param)
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _run_folder(tmp_path_factory):
    """Where real_prefect keeps the run's migrated Prefect database: the run's temporary folder, which every xdist
    worker's (basetemp/popen-gwN) is inside, so the workers build it once between them."""
    import real_prefect

    base = tmp_path_factory.getbasetemp()
    real_prefect.RUN_FOLDER = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def trainer_fork_server(tmp_path_factory):
    """A trainer fork server for this worker's session (loraflow.fork_server): the trainers its flows, commands, servers
    and workers start without DeepSpeed are forked from it, already imported (a suite run starts over a hundred, each
    about 3 s of CPU importing otherwise). Not waited for: a trainer requested before it listens is started as a
    process, as is one whose environment it refuses (its log, fork-server.log, says which and why)."""
    import subprocess
    import sys

    from loraflow.launch import FORK_SERVER_SETTING

    folder = tmp_path_factory.mktemp("fork-server")
    with (folder / "fork-server.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "loraflow.fork_server", str(folder / "socket")], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    os.environ[FORK_SERVER_SETTING] = str(folder / "socket")
    yield folder / "socket"
    os.environ.pop(FORK_SERVER_SETTING, None)
    server.kill()  # (its trainers get SIGTERM: PR_SET_PDEATHSIG)
    server.wait()


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's test server for this worker (flows run in the test's process report to it); its database starts as a
    copy of the run's migrated one (prefect_test_harness makes its own folder: it is given a seeded one)."""
    from prefect.testing import utilities
    from prefect.testing.utilities import prefect_test_harness

    import real_prefect
    from loraflow.cli import TEMPORARY_SERVER_START_SECONDS  # (the bound the CLI gives the same server)

    def seeded_folder() -> str:
        folder = tempfile.mkdtemp(prefix="prefect-test-harness-")
        real_prefect.seed_database(Path(folder), "prefect-test.db")  # (the file name the harness gives its database)
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utilities, "mkdtemp", seeded_folder)
        harness = prefect_test_harness(server_startup_timeout=TEMPORARY_SERVER_START_SECONDS)
        harness.__enter__()
    try:
        yield
    finally:
        harness.__exit__(None, None, None)


@pytest.fixture(scope="session")
def server_env(prefect_server) -> dict[str, str]:
    """The environment for a `loraflow` command that reaches this worker's test server, as a command given
    PREFECT_API_URL does: it starts no temporary server of its own (tests/test_temporary_server.py tests that start)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture
def silent_endpoint():
    """A loopback socket that accepts connections and never answers (an endpoint behind a dead proxy)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in accepted:
        connection.close()


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core for the suite or whole files; no workers (this process alone) where single tests are
    picked (node ids or -k), where starting and collecting in each worker would cost more than it saves."""
    if config.option.keyword or any("::" in arg for arg in config.args):
        return 0
    return None  # (xdist's own answer: the cores)


@pytest.hookimpl(tryfirst=True)  # (before xdist's own hook reads the xdist_group marks)
def pytest_collection_modifyitems(config, items):
    """Under xdist: tests that share a module-scoped fixture of their module stay on one worker (an xdist_group mark
    named after the module, unless the module set one), and the long work is handed out first, so the workers do not
    end with one still running a long group while the other idles: slow groups, then the other slow tests, then the
    rest. A stable sort: tests keep their order within a module (some rely on it, e.g. test_work_pool's last test
    stops the module's worker). The order is the same in every worker (xdist checks that they collected the same)."""
    def module_of(item) -> str:
        return item.nodeid.split("::", 1)[0]

    group_sizes: dict[str, int] = {}
    for item in items:
        if not item.get_closest_marker("xdist_group") and any(
                definition.scope in ("module", "class") for definitions in item._fixtureinfo.name2fixturedefs.values()
                for definition in definitions[-1:]):
            item.add_marker(pytest.mark.xdist_group(module_of(item).rsplit("/", 1)[-1].removesuffix(".py")))
        if marker := item.get_closest_marker("xdist_group"):
            name = marker.args[0] if marker.args else marker.kwargs.get("name", "default")
            group_sizes[name] = group_sizes.get(name, 0) + 1

    def cost_rank(item) -> tuple:
        marker = item.get_closest_marker("xdist_group")
        group = (marker.args[0] if marker.args else marker.kwargs.get("name", "default")) if marker else None
        slow = item.get_closest_marker("slow") is not None
        return (not slow, group is None, -group_sizes.get(group, 0))

    items.sort(key=cost_rank)
