"""The sample-media generator's files decode to exactly the content it claims."""

import numpy as np
import pytest
import sample_media as sm
from PIL import Image

torchcodec = pytest.importorskip("torchcodec")
from torchcodec.decoders import VideoDecoder  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    spec = sm.VideoSpec(seconds=3.0, fps=10.0, seed=3, object_intervals=((1.0, 2.0),), scene_changes=(1.5,))
    path = sm.write_video(tmp_path_factory.mktemp("media") / "clip.mp4", spec)
    return path, spec


def test_metadata_matches_spec(clip):
    path, spec = clip
    decoder = VideoDecoder(str(path))
    meta = decoder.metadata
    assert len(decoder) == spec.num_frames == 30
    assert meta.average_fps == pytest.approx(spec.fps)
    assert meta.duration_seconds == pytest.approx(spec.seconds, abs=1.0 / spec.fps)
    assert (meta.width, meta.height) == (spec.width, spec.height)


def test_every_frame_carries_its_index_and_object(clip):
    path, spec = clip
    decoder = VideoDecoder(str(path))
    batch = decoder.get_frames_in_range(0, len(decoder))
    for i, (frame, pts) in enumerate(zip(batch.data, batch.pts_seconds)):
        pixels = frame.numpy()
        assert sm.read_index(pixels) == i
        assert float(pts) == pytest.approx(spec.timestamp(i), abs=1e-3)
        assert sm.object_visible(pixels) == spec.object_present(spec.timestamp(i)), f"frame {i}"


def test_generated_frames_equal_their_decoded_version(clip):
    path, spec = clip
    decoded = VideoDecoder(str(path))[17].numpy().transpose(1, 2, 0).astype(np.int16)
    drawn = list(sm.frames(spec))[17].astype(np.int16)
    assert np.abs(decoded - drawn).mean() < 4.0


def test_scene_cut_changes_the_background(clip):
    path, _spec = clip
    decoder = VideoDecoder(str(path))
    before, after = decoder[14].numpy().astype(np.int16), decoder[16].numpy().astype(np.int16)
    same_scene = decoder[13].numpy().astype(np.int16)
    assert (
        np.abs(before[:, 20:] - after[:, 20:]).mean()
        > 20 * np.abs(before[:, 20:] - same_scene[:, 20:]).mean()
    )


def test_deterministic_by_seed():
    a = list(sm.frames(sm.VideoSpec(seconds=0.5, seed=7)))
    b = list(sm.frames(sm.VideoSpec(seconds=0.5, seed=7)))
    c = list(sm.frames(sm.VideoSpec(seconds=0.5, seed=8)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_images_of_odd_sizes(tmp_path):
    for w, h, suffix in [(333, 217, ".png"), (97, 451, ".jpg")]:
        path = sm.write_image(tmp_path / f"img{suffix}", w, h, seed=1)
        with Image.open(path) as img:
            assert img.size == (w, h)
            assert img.mode == "RGB"


def test_sample_set_and_error_files(tmp_path):
    result = sm.write_sample_set(tmp_path)
    assert (tmp_path / "manifest.json").exists()
    assert len(result.videos) == 2 and len(result.images) == 2
    audio = sm.write_audio_only(tmp_path / "audio.mp4")
    with pytest.raises((ValueError, RuntimeError)):
        VideoDecoder(str(audio))
    corrupt = sm.write_corrupt(tmp_path / "bad.mp4")
    with pytest.raises((ValueError, RuntimeError)):
        VideoDecoder(str(corrupt))


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="at least"):
        sm.VideoSpec(width=64)
    with pytest.raises(ValueError, match="even"):
        sm.VideoSpec(width=193)
