import os
import tempfile
from pathlib import Path

# Before Prefect is imported anywhere: a private Prefect home (database, local results) for the
# whole test session, so no test reads another run's cache, and no network calls.
_HOME = Path(tempfile.mkdtemp(prefix="loraflow-tests-prefect-"))
os.environ["PREFECT_HOME"] = str(_HOME)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_HOME / "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["LORAFLOW_CACHE"] = str(_HOME / "loraflow-cache")
os.environ.pop("LORAFLOW_STORE_URL", None)  # links are file:// unless a test starts a store server

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


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    from loraflow.cli import TEMPORARY_SERVER_START_SECONDS  # (the bound the CLI gives the same server)

    with prefect_test_harness(server_startup_timeout=TEMPORARY_SERVER_START_SECONDS):
        yield


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
