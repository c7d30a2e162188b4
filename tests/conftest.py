"""Shared pytest set-up: no model hub, `cuda` tests skip themselves on machines without a GPU, and
bitsandbytes computes 4-bit dequantization by its generic CPU path on every CPU (bnb_generic_cpu.py)."""
import os

# There is no model hub on the machines we test on; every checkpoint is built and saved by the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # Every comparison with bitsandbytes uses its generic CPU arithmetic: its AVX-512 kernel is wrong
    # on some shapes (tests/bnb_generic_cpu.py says where and why). Done before any test builds a model.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit notices from bitsandbytes' imports
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return
        import bnb_generic_cpu
        bnb_generic_cpu.use_generic_cpu_path()


def pytest_report_header(config):
    """What the suite ran on, so that a red run on someone's machine says so in its first lines."""
    import bnb_generic_cpu
    versions = [f"torch {torch.__version__}"]
    for name in ("transformers", "bitsandbytes", "peft"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} (not installed)")
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in bnb_generic_cpu.cpu_flags().items())
    saw = bnb_generic_cpu._state["bitsandbytes_saw_avx512bf16"]
    path = "not patched" if saw is None else f"generic CPU path (bitsandbytes detected avx512bf16: {saw})"
    return [", ".join(versions), f"CPU flags: {flags}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
            f"bitsandbytes 4-bit dequantization: {path}"]


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


def in_gloo_group(target, rank, world, tmp):
    """One spawned rank: join a gloo group through a file in tmp (as torchrun's ranks would), on one
    torch thread, run target(rank, world, tmp), then leave the group and end the process as a torchrun
    rank of the root files does (clip.leave_distributed: a barrier, so that no rank tears the group
    down while another still has a collective in flight, then os._exit, which skips the interpreter
    shutdown that gloo's threads made abort now and then, after all the work was done)."""
    import torch.distributed as dist
    import clip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    target(rank, world, tmp)
    os.environ["WORLD_SIZE"] = str(world)
    clip.leave_distributed()


def run_gloo_workers(target, world, tmp, timeout=120):
    """Start `world` spawned processes, each running target(rank, world, tmp) inside a gloo group
    (in_gloo_group); returns their exit codes."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=in_gloo_group, args=(target, rank, world, str(tmp))) for rank in range(world)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=timeout)
    return [w.exitcode for w in workers]
