"""The demo's temporal-grounding task: labels agree with the decoded pixels; scoring is exact."""

from __future__ import annotations

import pytest

tg = pytest.importorskip("temporal_grounding")
sample_media = pytest.importorskip("sample_media")
keye_vision = pytest.importorskip("keye_vision")
pytest.importorskip("torchcodec")


def test_answers_match_what_the_processor_shows(tmp_path):
    from keye_train.processor import KeyeProcessor

    processor = KeyeProcessor()
    for clip in tg.make_clips(tmp_path, 4, seed=7):
        video = keye_vision.load_video(clip.video, fps=tg.FPS)
        assert video.timestamps == [i / tg.FPS for i in range(tg.NUM_FRAMES)]
        shown = [
            t
            for t, frame in zip(video.timestamps, video.frames)
            if sample_media.object_visible(frame.numpy())
        ]
        assert shown == clip.visible and shown[0] == clip.start and clip.end == shown[-1] + 1 / tg.FPS
        record = tg.grounding_record(clip)
        encoded = processor.encode_chat(record["messages"])
        assert processor.decode(encoded.input_ids[encoded.labels != -100]).endswith(tg.answer(clip))
        assert tg.parse_interval(tg.answer(clip)) == (clip.start, clip.end)


def test_scoring_and_baselines():
    assert tg.iou((1.0, 2.0), (1.0, 2.0)) == 1.0
    assert tg.iou((0.0, 1.0), (0.5, 1.5)) == pytest.approx(1 / 3)
    assert tg.iou(None, (0.0, 1.0)) == 0.0
    assert tg.parse_interval("It appears from 0.5 to 2.0 seconds.") == (0.5, 2.0)
    assert tg.parse_interval("from 2.0 to 1.0") is None and tg.parse_interval("no idea") is None
    assert tg.score([(0.0, 1.0), None], [(0.0, 1.0), (1.0, 2.0)]) == {"mIoU": 0.5, "R@0.5": 0.5}
    # chance is the exact mean over every interval the task can ask about
    truth = (0.5, 1.5)
    expected = sum(tg.iou((k / tg.FPS, m / tg.FPS), truth) for k, m in tg.INTERVALS) / len(tg.INTERVALS)
    assert tg.chance([truth])["mIoU"] == pytest.approx(expected)
    assert len(tg.INTERVALS) == tg.NUM_FRAMES * (tg.NUM_FRAMES - 1) // 2
    assert tg.prior([truth] * 3, [truth]) == {"mIoU": 1.0, "R@0.5": 1.0}
