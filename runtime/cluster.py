"""``fssc deal --cluster ADDRESS``: the dealer's batch jobs on a Dask distributed cluster.

The jobs are the ones ``fssc deal --workers N`` runs in local processes
(:func:`fssc.runtime.session._deal_batch`, one batch each, whole); here a Dask scheduler hands them to its
workers, as many at a time as the cluster has worker threads. Each job is sent the dealer program's text
(the copy ``fssc deal`` checked), the deal id, the setup seed and where its files go (a key folder every
worker can see at the same path, or a party's key receiver), nothing the dealer does not hold; the workers
need fssc installed (``pip install 'fssc[cluster]'``) and import it to run the job.

Dask is an optional dependency (the ``cluster`` extra), imported only here and only when ``--cluster`` is
given: the rest of the runtime never needs it.
"""

from __future__ import annotations

from fssc.errors import FsscError

SCHEDULER_TIMEOUT = 30.0  # default seconds to reach the scheduler


class ClusterExecutor:
    """A concurrent.futures executor on a Dask cluster (its client's), that closes the client when shut down."""

    def __init__(self, client):
        self.client = client
        self._executor = client.get_executor(pure=False)  # every job is new, even with the same arguments

    def submit(self, fn, *args):
        return self._executor.submit(fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        try:
            self._executor.shutdown(wait=wait)
        finally:
            self.client.close()


SLOW_MALLOC = "MALLOC_TRIM_THRESHOLD_"  # Dask's nanny sets it in its workers by default (65536)


def _malloc_trim_threshold() -> str | None:
    import os

    return os.environ.get(SLOW_MALLOC)


def cluster_executor(address: str, timeout: float | None = None, warn=None) -> tuple[ClusterExecutor, int]:
    """(an executor on the Dask scheduler at ``address``, its worker threads): FsscError in one line if Dask
    is not installed, the scheduler cannot be reached within ``timeout`` s or has no workers. ``warn(line)``
    hears of workers whose allocator setting makes dealing slow (Dask's default ``MALLOC_TRIM_THRESHOLD_``
    turns every large numpy temporary into an mmap and munmap: measured 2-2.5x slower)."""
    try:
        from dask import distributed
    except ImportError as e:
        raise FsscError(
            f"--cluster needs Dask distributed (no module {e.name!r}): pip install 'fssc[cluster]'"
        ) from None
    t = SCHEDULER_TIMEOUT if timeout is None else timeout
    try:
        client = distributed.Client(address, timeout=f"{t}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FsscError(f"--cluster {address}: cannot reach the Dask scheduler within {t:g} s ({reason})") from None
    try:
        client.wait_for_workers(1, timeout=t)
    except (OSError, TimeoutError) as e:
        client.close()
        raise FsscError(
            f"--cluster {address}: the scheduler has no worker after {t:g} s ({type(e).__name__})"
        ) from None
    threads = sum(client.nthreads().values())
    if warn is not None:
        try:
            slow = {w: v for w, v in client.run(_malloc_trim_threshold).items() if v is not None}
        except Exception:  # a check only: a worker that cannot answer runs the jobs all the same
            slow = {}
        if slow:
            warn(
                f"--cluster: {len(slow)} of {len(client.nthreads())} workers run with {SLOW_MALLOC}="
                f"{next(iter(slow.values()))} (Dask's default), which makes dealing about 2x slower; start them "
                f"with `distributed.nanny.pre-spawn-environ.{SLOW_MALLOC}: null` in Dask's configuration "
                "(docs/scaling.md)"
            )
    return ClusterExecutor(client), max(1, threads)


def describe_failure(e: BaseException) -> str | None:
    """One line for a cluster failure (a worker that died with a job), or None for an error of the job's own."""
    if type(e).__name__ == "KilledWorker":
        return f"a cluster worker died dealing a batch, and again on retry ({str(e).splitlines()[0][:160]})"
    if type(e).__name__ in ("CommClosedError", "CancelledError", "FutureCancelledError"):
        return f"lost the Dask cluster mid-deal ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    return None
