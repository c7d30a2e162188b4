"""Shared pytest set-up: no model hub, and `cuda` tests skip themselves on machines without a GPU."""
import os

# There is no model hub on the machines we test on; every checkpoint is built and saved by the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: its tensors are tiny, a second OpenMP thread only adds
    synchronisation, and on a busy machine its spin-waiting multiplies the run time. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_gloo_workers(target, world, tmp, timeout=120):
    """Start `world` spawned processes running target(rank, world, tmp) (each joins a gloo group
    through a file in tmp, as torchrun's ranks would); returns their exit codes."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=(rank, world, str(tmp))) for rank in range(world)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=timeout)
    return [w.exitcode for w in workers]
