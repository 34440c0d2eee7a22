"""The dynamic batcher on a scripted backend: which texts share a model call, and when.

The backend answers "the next character is the text's last character" and can be held inside a
call, so each test decides exactly what is queued while a batch runs.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nextchar.server.backends.base import BatchOutput
from nextchar.server.batcher import HIGH, LOW, Batcher, Item
from nextchar.server.errors import DeadlineExceeded, Overloaded
from nextchar.server.predictor import PredictOpts, TextResult

V = 8


class HeldBackend:
    """Two workers; every call waits until `release` is set (the test holds it or not)."""

    name, device, workers = "held", "cpu", 2

    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.calls: list[int] = []  # batch size of each call, in start order
        self.started = threading.Semaphore(0)

    def make_executor(self, initializer: Callable[[], object] | None = None) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.workers, initializer=initializer)

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((1, batch, 2), dtype=np.float32)

    def warmup(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def run(self, ids, lengths, state, positions=False) -> BatchOutput:
        self.calls.append(len(ids))
        self.started.release()
        assert self.release.wait(10), "test never released the backend"
        logits = np.zeros((len(ids), V), dtype=np.float32)
        logits[np.arange(len(ids)), ids[np.arange(len(ids)), lengths - 1]] = 10.0
        return BatchOutput(logits=logits, state=state, position_logits=None)


def top1(out: BatchOutput, rows: np.ndarray, its) -> list[TextResult]:
    """A finish step: each row's argmax (the batcher passes what to do with outputs in)."""
    return [TextResult(top_ids=out.logits[r].argmax(keepdims=True), top_probs=np.ones(1))
            for r in rows.tolist()]


def items(loop: asyncio.AbstractEventLoop, texts: list[list[int]], deadline=None,
          lane: int = HIGH) -> list[Item]:
    return [Item(ids=np.array(t, dtype=np.int64), future=loop.create_future(), finish=top1,
                 params=PredictOpts(1), deadline=deadline, lane=lane) for t in texts]


async def started(backend: HeldBackend, n: int, timeout_s: float = 5.0) -> bool:
    """True once n more calls have started within timeout_s."""
    for _ in range(n):
        if not await asyncio.to_thread(backend.started.acquire, True, timeout_s):
            return False
    return True


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def held_batcher(**settings) -> tuple[HeldBackend, Batcher]:
    """A started batcher whose backend holds every call until the test sets `release`."""
    backend = HeldBackend()
    b = Batcher(backend, **settings)
    await b.start()
    backend.release.clear()
    return backend, b


async def occupy_both_workers(backend: HeldBackend, b: Batcher) -> list[asyncio.Task]:
    """One held single-text call per worker, started one after the other."""
    loop = asyncio.get_running_loop()
    tasks = []
    for _ in range(2):
        tasks.append(asyncio.create_task(b.submit(items(loop, [[1]]))))
        assert await started(backend, 1)
    return tasks


def test_queued_texts_share_one_call_and_keep_their_answers() -> None:
    async def main() -> None:
        backend, b = await held_batcher(parallel_batch_chars=0)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(items(loop, [[1]])))
        assert await started(backend, 1)
        # Both workers are free to start, but only one is needed for what is queued next.
        rest = [asyncio.create_task(b.submit(items(loop, [[i, i + 1]]))) for i in range(2, 7)]
        assert await started(backend, 1)  # the second worker takes the 5 queued texts at once
        backend.release.set()
        answers = [r[0].top_ids[0] for r in await asyncio.gather(first, *rest)]
        assert answers == [1, 3, 4, 5, 6, 7]
        assert backend.calls == [1, 5]
        await b.close()

    run(main())


def test_a_second_worker_waits_for_a_big_enough_queue() -> None:
    async def main() -> None:
        backend, b = await held_batcher(parallel_batch_chars=100)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(items(loop, [[1] * 10])))
        assert await started(backend, 1)
        small = [asyncio.create_task(b.submit(items(loop, [[2] * 10]))) for _ in range(3)]
        # 30 characters queued < 100: the free worker stays idle while the first call runs.
        assert not await started(backend, 1, timeout_s=0.3)
        big = asyncio.create_task(b.submit(items(loop, [[3] * 10] * 8)))  # now 110 queued
        assert await started(backend, 1)  # the second worker starts with the first still held
        assert backend.calls == [1, 11]
        backend.release.set()
        await asyncio.gather(first, *small, big)
        await b.close()

    run(main())


def test_expired_and_cancelled_texts_are_not_computed() -> None:
    async def main() -> None:
        backend, b = await held_batcher(parallel_batch_chars=0)
        loop = asyncio.get_running_loop()
        blocker = await occupy_both_workers(backend, b)  # what follows waits in the queue
        expired = asyncio.create_task(b.submit(items(loop, [[2]], deadline=loop.time() + 0.05)))
        gone = asyncio.create_task(b.submit(items(loop, [[3]])))
        live = asyncio.create_task(b.submit(items(loop, [[4]])))
        await asyncio.sleep(0.1)
        gone.cancel()
        backend.release.set()
        with pytest.raises(DeadlineExceeded):
            await expired
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (await live)[0].top_ids[0] == 4
        await asyncio.gather(*blocker)
        assert sorted(backend.calls) == [1, 1, 1]  # the live text ran alone
        assert b.stats.expired == 1 and b.stats.cancelled == 1
        await b.close()

    run(main())


def test_a_full_queue_answers_overloaded_at_once() -> None:
    async def main() -> None:
        backend, b = await held_batcher(max_queue_texts=4, parallel_batch_chars=0)
        loop = asyncio.get_running_loop()
        held = await occupy_both_workers(backend, b)
        queued = asyncio.create_task(b.submit(items(loop, [[2]] * 3)))
        await asyncio.sleep(0)
        assert b.queue_depth == 3
        with pytest.raises(Overloaded, match="3 texts queued in the high-priority lane, limit 4"):
            await b.submit(items(loop, [[3]] * 2))
        assert b.stats.rejected == 1
        backend.release.set()
        await asyncio.gather(*held, queued)
        assert backend.calls == [1, 1, 3]
        await b.close()

    run(main())


class OneWorkerBackend(HeldBackend):
    workers = 1


@pytest.mark.parametrize("ahead", [False, True])
def test_a_worker_pulling_batches_lets_queued_jobs_run_first(ahead: bool) -> None:
    """Generate's steps (submit_steps) queued while a batch runs go before the next batch: a
    worker that takes batch after batch itself must not starve them. Only a batch holding a
    Generate prompt (Item.ahead) goes first: streams opened together must not each wait for a
    step over the others."""

    async def main() -> None:
        backend = OneWorkerBackend()
        b = Batcher(backend, parallel_batch_chars=0)
        await b.start()
        backend.release.clear()
        loop = asyncio.get_running_loop()
        order: list[str] = []
        first = asyncio.create_task(b.submit(items(loop, [[1]])))
        assert await started(backend, 1)
        queued = items(loop, [[2], [3]])
        for it in queued:
            it.ahead = ahead
        second = asyncio.create_task(b.submit(queued))
        await asyncio.sleep(0.05)  # queued behind the running batch
        step_ran = asyncio.Event()

        def step() -> None:
            order.append(f"job after {len(backend.calls)} calls")
            loop.call_soon_threadsafe(step_ran.set)

        b.submit_steps(step)
        backend.release.set()
        await asyncio.gather(first, second, step_ran.wait())
        assert order == [f"job after {2 if ahead else 1} calls"] and backend.calls == [1, 2]
        await b.close()

    run(main())


def test_the_high_lane_goes_first_and_never_waits_behind_a_batch_job() -> None:
    """Low-lane (batch job) batches use one of the two workers; a high-lane text queued while
    one runs starts at once on the other, and queued high texts go before queued low ones."""

    async def main() -> None:
        backend, b = await held_batcher(parallel_batch_chars=0)
        assert b.low_lane_workers == 1
        loop = asyncio.get_running_loop()
        backend.release.set()
        await b.submit(items(loop, [[6]]))  # interactive traffic: the reservation is on
        backend.release.clear()
        assert await started(backend, 1)
        job = [asyncio.create_task(b.submit(items(loop, [[5]], lane=LOW)))]
        assert await started(backend, 1)  # the first low text runs ...
        job += [asyncio.create_task(b.submit(items(loop, [[5]], lane=LOW))) for _ in range(2)]
        assert not await started(backend, 1, timeout_s=0.2)  # ... the others wait: 1 worker
        interactive = asyncio.create_task(b.submit(items(loop, [[7]])))
        assert await started(backend, 1)  # on the reserved worker, with the low call held
        backend.release.set()
        assert (await interactive)[0].top_ids[0] == 7
        await asyncio.gather(*job)
        assert backend.calls == [1, 1, 1, 2]  # the two queued low texts ran together, after
        await b.close()

    run(main())


def test_queued_high_texts_are_taken_before_queued_low_ones() -> None:
    async def main() -> None:
        backend = OneWorkerBackend()
        b = Batcher(backend, parallel_batch_chars=0)
        await b.start()
        backend.release.clear()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(items(loop, [[1]])))
        assert await started(backend, 1)
        low = asyncio.create_task(b.submit(items(loop, [[2], [2]], lane=LOW)))
        await asyncio.sleep(0.02)
        high = asyncio.create_task(b.submit(items(loop, [[3, 3, 3]])))
        await asyncio.sleep(0.02)
        backend.release.set()
        await asyncio.gather(first, low, high)
        assert backend.calls == [1, 1, 2]  # first, then the later high text, then the low ones
        await b.close()

    run(main())


def test_each_lane_has_its_own_queue_bound_and_timeout() -> None:
    from nextchar.server.batcher import LanePolicy

    async def main() -> None:
        backend, b = await held_batcher(max_queue_texts=2, parallel_batch_chars=0,
                                        low_lane=LanePolicy(max_queue_texts=5, timeout_s=0.05))
        loop = asyncio.get_running_loop()
        held = await occupy_both_workers(backend, b)
        low = asyncio.create_task(b.submit(items(loop, [[2]] * 4, lane=LOW)))  # fits 5
        await asyncio.sleep(0)
        high = asyncio.create_task(b.submit(items(loop, [[3]] * 2)))  # fits 2
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="high-priority lane, limit 2"):
            await b.submit(items(loop, [[4]]))
        with pytest.raises(Overloaded, match="low-priority lane, limit 5"):
            await b.submit(items(loop, [[4]] * 2, lane=LOW))
        await asyncio.sleep(0.1)
        backend.release.set()
        with pytest.raises(DeadlineExceeded):  # the low lane's 50 ms queue timeout
            await low
        await asyncio.gather(*held, high)
        await b.close()

    run(main())


def test_a_request_larger_than_its_lanes_bound_says_what_fits() -> None:
    """A lane bound under the request size (--low-max-queue-texts 16, a batch job's requests
    of 64 texts) can never admit it, idle or not: the refusal says so and what would fit,
    instead of "retry with backoff", which a job followed until its retries ran out."""
    from nextchar.server.batcher import LanePolicy

    async def main() -> None:
        backend, b = await held_batcher(parallel_batch_chars=0,
                                        low_lane=LanePolicy(max_queue_texts=4))
        loop = asyncio.get_running_loop()
        with pytest.raises(Overloaded) as e:
            await b.submit(items(loop, [[1]] * 6, lane=LOW))
        assert e.value.message == (
            "server overloaded: a request of 6 texts is more than the low-priority lane "
            "queues, limit 4 (GetModelInfo limits); send at most 4 texts per request")
        backend.release.set()
        assert len(await b.submit(items(loop, [[1]] * 4, lane=LOW))) == 4
        await b.close()

    run(main())


def test_max_batch_delay_still_applies_after_a_worker_took_a_batch() -> None:
    """The delay flag is cleared by whoever takes the batch, not only by the loop's timer."""

    async def main() -> None:
        backend = OneWorkerBackend()
        b = Batcher(backend, parallel_batch_chars=0, max_batch_delay_ms=100)
        await b.start()
        loop = asyncio.get_running_loop()
        for _ in range(3):  # each lone text waits ~the delay: the timer, then its batch
            started_at = loop.time()
            await b.submit(items(loop, [[1]]))
            assert loop.time() - started_at >= 0.09
        # While a call is held, the timer fires with no free worker; the worker then takes the
        # batch itself. The next lone text must still wait for a delay.
        backend.release.clear()
        first = asyncio.create_task(b.submit(items(loop, [[1]])))
        assert await started(backend, 1)
        second = asyncio.create_task(b.submit(items(loop, [[2]])))
        await asyncio.sleep(0.15)  # the delay ran out while the worker was busy
        backend.release.set()
        await asyncio.gather(first, second)
        started_at = loop.time()
        await b.submit(items(loop, [[3]]))
        assert loop.time() - started_at >= 0.09
        await b.close()

    run(main())


def prompts(loop: asyncio.AbstractEventLoop, texts: list[list[int]], deadline=None) -> list[Item]:
    """Items as Generate's prefill submits them (Item.ahead)."""
    out = items(loop, texts, deadline)
    for it in out:
        it.ahead = True
    return out


async def waited_s(b: Batcher, timeout_s: float, stepping: int = 1) -> float:
    """Seconds a step over `stepping` streams blocked in wait_for_prompts, called from a thread
    of its own."""

    def wait() -> float:
        t0 = time.monotonic()
        b.wait_for_prompts(timeout_s, stepping)
        return time.monotonic() - t0

    return await asyncio.to_thread(wait)


def test_a_step_waits_while_a_prompt_is_in_its_model_call() -> None:
    """Generate's steps let the prompts of new streams go first: the wait ends when the prompt's
    call returns, not at the timeout; with nothing pending it does not wait, nor does a step
    over more streams than there are prompts pending. ("At once": well under the 5 s timeout
    a wrong wait would take, with room for a loaded machine's thread scheduling.)"""

    async def main() -> None:
        backend, b = await held_batcher()
        loop = asyncio.get_running_loop()
        assert await waited_s(b, 5.0) < 2.0  # no prompt: at once
        prompt = asyncio.create_task(b.submit(prompts(loop, [[1, 2]])))
        assert await started(backend, 1)  # the prompt's call is held
        assert await waited_s(b, 5.0, stepping=2) < 2.0  # 2 streams to advance, 1 prompt
        step = asyncio.create_task(waited_s(b, 5.0))
        await asyncio.sleep(0.3)
        assert not step.done()
        backend.release.set()
        assert 0.25 < await step < 4.0
        assert (await prompt)[0].top_ids.tolist() == [2]
        assert await waited_s(b, 5.0) < 2.0  # the prompt is done: at once again
        await b.close()

    run(main())


def test_a_step_waits_for_queued_prompts_and_at_most_its_timeout() -> None:
    async def main() -> None:
        backend, b = await held_batcher()
        loop = asyncio.get_running_loop()
        held = await occupy_both_workers(backend, b)
        first = asyncio.create_task(b.submit(prompts(loop, [[3]])))
        second = asyncio.create_task(b.submit(prompts(loop, [[4, 5]])))
        await asyncio.sleep(0.05)  # queued: both workers are busy
        assert 0.15 < await waited_s(b, 0.2) < 2.0  # still queued: the timeout ends the wait
        step = asyncio.create_task(waited_s(b, 5.0, stepping=2))  # while 2 prompts pend
        await asyncio.sleep(0.1)
        assert not step.done()
        backend.release.set()  # the workers finish and take the prompts
        assert await step < 4.0
        assert [r[0].top_ids.tolist() for r in await asyncio.gather(first, second)] == [[3], [5]]
        await asyncio.gather(*held)
        await b.close()

    run(main())


def test_a_dropped_prompt_ends_the_wait() -> None:
    """A prompt that expires in the queue is never computed; a step waiting for it goes on."""

    async def main() -> None:
        backend, b = await held_batcher()
        loop = asyncio.get_running_loop()
        held = await occupy_both_workers(backend, b)
        prompt = asyncio.create_task(b.submit(prompts(loop, [[3]], deadline=loop.time() + 0.05)))
        step = asyncio.create_task(waited_s(b, 5.0))
        await asyncio.sleep(0.2)  # the prompt's deadline passed in the queue
        assert not step.done()
        backend.release.set()
        assert await step < 4.0
        with pytest.raises(DeadlineExceeded):
            await prompt
        await asyncio.gather(*held)
        assert backend.calls == [1, 1]  # the expired prompt was not computed
        await b.close()

    run(main())


def test_a_step_never_waits_for_prompts_only_its_own_worker_could_run() -> None:
    """One worker: the prompts need the thread the step holds, so it does not wait."""

    async def main() -> None:
        backend = OneWorkerBackend()
        b = Batcher(backend)
        await b.start()
        backend.release.clear()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(prompts(loop, [[1]])))
        assert await started(backend, 1)
        assert await waited_s(b, 5.0) < 2.0  # at once: well under the 5 s timeout
        backend.release.set()
        await first
        await b.close()

    run(main())


class FailingBackend(HeldBackend):
    def run(self, ids, lengths, state, positions=False) -> BatchOutput:
        raise RuntimeError("the runtime failed")


def test_a_backend_failure_fails_that_batch_and_the_batcher_goes_on() -> None:
    async def main() -> None:
        backend = FailingBackend()
        b = Batcher(backend, parallel_batch_chars=0)
        await b.start()
        loop = asyncio.get_running_loop()
        with pytest.raises(RuntimeError, match="the runtime failed"):
            await b.submit(items(loop, [[1], [2]]))
        assert b.stats.failed == 2
        with pytest.raises(RuntimeError):
            await b.submit(items(loop, [[1]]))  # still taking work
        await b.close()

    run(main())


def test_each_lane_bounds_the_characters_it_queues() -> None:
    async def main() -> None:
        backend, b = await held_batcher(max_queue_chars=25, parallel_batch_chars=10**6)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(items(loop, [[1] * 10])))
        assert await started(backend, 1)
        queued = asyncio.create_task(b.submit(items(loop, [[2] * 20])))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="20 characters queued in the high-priority lane, "
                                             "limit 25"):
            await b.submit(items(loop, [[3] * 10]))
        low = asyncio.create_task(b.submit(items(loop, [[4] * 10], lane=LOW)))  # its own bound
        await asyncio.sleep(0)
        backend.release.set()
        await asyncio.gather(first, queued, low)
        await b.close()

    run(main())


def test_a_batch_job_alone_gets_every_worker() -> None:
    """No interactive call for HIGH_IDLE_S: low-lane batches may use both workers."""

    async def main() -> None:
        backend, b = await held_batcher(parallel_batch_chars=0)
        loop = asyncio.get_running_loop()
        job = [asyncio.create_task(b.submit(items(loop, [[5]], lane=LOW)))]
        assert await started(backend, 1)
        job.append(asyncio.create_task(b.submit(items(loop, [[6]], lane=LOW))))
        assert await started(backend, 1)  # the second worker too: nobody interactive
        backend.release.set()
        await asyncio.gather(*job)
        assert backend.calls == [1, 1]
        await b.close()

    run(main())


def test_the_low_lane_has_its_own_batch_size() -> None:
    from nextchar.server.batcher import LanePolicy

    async def main() -> None:
        backend = OneWorkerBackend()
        b = Batcher(backend, parallel_batch_chars=0, max_batch_size=8,
                    low_lane=LanePolicy(max_batch_size=3))
        await b.start()
        backend.release.clear()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(items(loop, [[1]])))
        assert await started(backend, 1)
        low = asyncio.create_task(b.submit(items(loop, [[2]] * 7, lane=LOW)))
        high = asyncio.create_task(b.submit(items(loop, [[3]] * 6)))
        await asyncio.sleep(0.02)
        backend.release.set()
        await asyncio.gather(first, low, high)
        assert backend.calls == [1, 6, 3, 3, 1]  # high up to 8 per call, low up to 3
        await b.close()

    run(main())


def _nice_of_threads(executor: ThreadPoolExecutor, n: int) -> list[int]:
    """The nice value of each of n executor threads (n tasks waiting for each other each run
    on a thread of their own)."""
    barrier = threading.Barrier(n)

    def nice() -> int:
        barrier.wait(5)
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    return sorted(f.result() for f in [executor.submit(nice) for _ in range(n)])


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux's")
def test_model_threads_run_nicer_than_the_loop_and_the_low_lane_nicer_still() -> None:
    async def main() -> None:
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        b = Batcher(HeldBackend(), worker_nice=3, low_lane_nice=7)
        # Every thread exists before any work: none is started by a worker of the other lane,
        # whose nice value it would inherit.
        assert len(b.executor._threads) == 2 and len(b._low_executor._threads) == 2
        assert _nice_of_threads(b.executor, 2) == [min(19, base + 3)] * 2
        assert _nice_of_threads(b._low_executor, 2) == [min(19, base + 7)] * 2
        await b.close()
        off = Batcher(HeldBackend(), worker_nice=0, low_lane_nice=0)
        assert _nice_of_threads(off.executor, 2) == [base] * 2
        assert off._low_executor is None
        await off.close()

    run(main())
