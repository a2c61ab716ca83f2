"""serve/batcher.py: batches form from what waits when the decoder is free, bounded by max_batch_size."""

from __future__ import annotations

import asyncio

import pytest

from serve.batcher import DecodeBatcher


class SlowDecoder:
    """Records each batch; each call takes `seconds` (the event loop runs meanwhile, as with a decode thread)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[list[int]] = []

    async def __call__(self, queries: list[int]) -> list[int]:
        self.batches.append(list(queries))
        await asyncio.sleep(self.seconds)
        if -1 in queries:
            raise RuntimeError("bad query")
        return [q * 10 for q in queries]


def test_requests_arriving_during_a_decode_form_the_next_batch_together() -> None:
    async def scenario() -> tuple[list[int], list[list[int]]]:
        decoder = SlowDecoder(0.05)
        batcher = DecodeBatcher(decoder, max_batch_size=32, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the decoder is busy with [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 17)]
        return await asyncio.gather(first, *rest), decoder.batches

    answers, batches = asyncio.run(scenario())
    assert answers == [i * 10 for i in range(17)]  # each caller gets its own answer, in order
    assert batches == [[0], list(range(1, 17))]  # not many small batches queued behind the first


def test_batches_are_capped_and_the_cap_can_change_between_batches() -> None:
    async def scenario() -> list[list[int]]:
        decoder = SlowDecoder(0.01)
        batcher = DecodeBatcher(decoder, max_batch_size=4, wait_s=0.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        batcher.configure(max_batch_size=8, wait_s=0.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(10, 18)))
        return decoder.batches

    batches = asyncio.run(scenario())
    assert [len(b) for b in batches] == [4, 4, 2, 8]


def test_a_wait_gathers_stragglers_into_a_batch_that_is_not_full() -> None:
    async def scenario() -> list[list[int]]:
        decoder = SlowDecoder(0.0)
        batcher = DecodeBatcher(decoder, max_batch_size=8, wait_s=0.2)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        await asyncio.gather(first, batcher.submit(1))
        return decoder.batches

    assert asyncio.run(scenario()) == [[0, 1]]


def test_a_failed_decode_fails_its_callers_and_the_batcher_keeps_serving() -> None:
    async def scenario() -> tuple[list[object], int]:
        batcher = DecodeBatcher(SlowDecoder(0.0), max_batch_size=8, wait_s=0.0)
        failed = await asyncio.gather(batcher.submit(-1), batcher.submit(3), return_exceptions=True)
        return failed, await batcher.submit(4)

    failed, later = asyncio.run(scenario())
    assert all(isinstance(f, RuntimeError) for f in failed) and later == 40


def test_a_caller_that_gave_up_is_not_decoded() -> None:
    async def scenario() -> list[list[int]]:
        decoder = SlowDecoder(0.05)
        batcher = DecodeBatcher(decoder, max_batch_size=8, wait_s=0.0)
        busy = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(1), 0.01)  # times out while [0] decodes
        await asyncio.gather(busy, batcher.submit(2))
        return decoder.batches

    assert asyncio.run(scenario()) == [[0], [2]]


def test_a_decode_answering_the_wrong_number_fails_its_batch_and_the_batcher_keeps_serving() -> None:
    async def scenario() -> tuple[list[object], int]:
        calls = 0

        async def one_answer_short(queries: list[int]) -> list[int]:
            nonlocal calls
            calls += 1
            answers = [q * 10 for q in queries]
            return answers[:-1] if calls == 1 else answers

        batcher = DecodeBatcher(one_answer_short, max_batch_size=8, wait_s=0.0)
        # Short timeouts: a batcher whose consumer died would leave these waiting forever.
        failed = await asyncio.wait_for(asyncio.gather(batcher.submit(1), batcher.submit(2),
                                                       return_exceptions=True), 2)
        return failed, await asyncio.wait_for(batcher.submit(3), 2)

    failed, later = asyncio.run(scenario())
    # No caller of the bad batch gets an answer that may be another's: all of them get the error.
    assert all(isinstance(f, RuntimeError) and "answered 1 of 2" in str(f) for f in failed), failed
    assert later == 30


def test_stop_ends_the_consumer_and_fails_every_waiting_caller() -> None:
    async def scenario() -> tuple[list[object], object, set[asyncio.Task[object]]]:
        batcher = DecodeBatcher(SlowDecoder(0.5), max_batch_size=1, wait_s=0.0)
        decoding = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # [0] decodes
        queued = asyncio.create_task(batcher.submit(1))  # waits for the decoder
        await asyncio.sleep(0.01)
        batcher.stop()
        outcomes = await asyncio.wait_for(asyncio.gather(decoding, queued, return_exceptions=True), 2)
        late = await asyncio.wait_for(asyncio.gather(batcher.submit(2), return_exceptions=True), 2)
        await asyncio.sleep(0.01)
        return outcomes, late[0], asyncio.all_tasks() - {asyncio.current_task()}

    outcomes, late, tasks_left = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) and "stopped" in str(o) for o in [*outcomes, late]), [*outcomes, late]
    assert tasks_left == set()  # the consumer task has ended
