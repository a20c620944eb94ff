"""Write the generated sample of configs/kuairand_pure.yaml into configs/samples/kuairand-pure/.

It imitates the file layout of KuaiRand-Pure (Gao et al., CIKM 2022, https://kuairand.com; Kuaishou
short-video logs): the two standard logs ``log_standard_4_08_to_4_21_pure.csv`` and
``log_standard_4_22_to_5_08_pure.csv`` (one row per user x video impression, ``date`` as yyyymmdd),
``user_features_pure.csv`` and ``video_features_basic_pure.csv``, with the published column names and
order, and cells written as they are there (``follow_user_num_range`` intervals such as ``(10,50]``,
``tag`` as comma-separated ids, a blank ``video_duration`` here and there). ``long_view`` follows the
published rule: play_time_ms >= duration_ms for videos up to 18 s, play_time_ms >= 18 s for longer ones.

NO ROW OF IT IS REAL: users, videos and feedback are drawn at random (seeded), with feedback that depends
on the user's activity and one-hot features, the author, the tab, the video's type and length, so a model
has something to learn; the rates of the rare signals (follow, comment, forward, hate) are raised far above
the real ones so that a few thousand rows hold positives of each. No number measured on this sample is a
result on the real data set.

    python configs/samples/make_kuairand.py      # rewrites the four files (deterministic)
"""

from __future__ import annotations

import csv
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "kuairand-pure"
USERS, VIDEOS, AUTHORS = 80, 400, 60
LOGS = {  # file -> (first day, last day, rows)
    "log_standard_4_08_to_4_21_pure.csv": (date(2022, 4, 8), date(2022, 4, 21), 3500),
    "log_standard_4_22_to_5_08_pure.csv": (date(2022, 4, 22), date(2022, 5, 8), 1500),
}
LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
    "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab"
).split(",")
USER_HEADER = (
    "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,follow_user_num,"
    "follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,friend_user_num_range,"
    "register_days,register_days_range"
).split(",") + [f"onehot_feat{i}" for i in range(18)]
VIDEO_HEADER = (
    "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,"
    "server_height,music_id,music_type,tag"
).split(",")
RARE = {"is_like": 0.08, "is_follow": 0.03, "is_comment": 0.03, "is_forward": 0.03, "is_hate": 0.03}


def _range(value: int, edges: list[int]) -> str:
    """The published interval label of a count, e.g. ``(10,50]`` (``0`` for zero, ``2000+`` past the last)."""
    if value == 0:
        return "0"
    for low, high in zip(edges[:-1], edges[1:]):
        if low < value <= high:
            return f"({low},{high}]"
    return f"{edges[-1]}+"


def main() -> None:
    rng = np.random.default_rng(2022)
    OUT.mkdir(parents=True, exist_ok=True)

    # users: an activity level and one-hot features; hidden taste for clicking and for each rare signal
    degrees = np.array(["full_active", "high_active", "middle_active", "UNKNOWN"])
    degree = rng.choice(len(degrees), USERS, p=[0.5, 0.25, 0.2, 0.05])
    onehot = rng.integers(0, 4, (USERS, 18))
    user_taste = rng.normal(0, 1.0, (USERS, 1 + len(RARE)))
    user_taste[:, 0] += (onehot[:, 0] == 1) * 0.8 - (degree == 2) * 0.6
    user_ids = np.sort(rng.choice(np.arange(0, 27285), USERS, replace=False))
    with open(OUT / "user_features_pure.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(USER_HEADER)
        for i in range(USERS):
            follow, fans, friends = rng.geometric(0.02), rng.geometric(0.05) - 1, rng.geometric(0.2) - 1
            days = int(rng.integers(10, 2000))
            writer.writerow(
                [user_ids[i], degrees[degree[i]], int(degree[i] == 3), int(rng.random() < 0.05)]
                + [int(rng.random() < 0.3), follow, _range(follow, [0, 10, 50, 100, 150, 250, 500])]
                + [fans, _range(fans, [0, 1, 10, 100, 1000]), friends, _range(friends, [0, 5, 30, 60, 120, 250])]
                + [days, _range(days, [0, 15, 30, 60, 90, 180, 365, 730])]
                + onehot[i].tolist()
            )

    # videos: an author, a type, a length (ms), 1-3 tags; hidden appeal per signal (by author and tag)
    video_ids = np.sort(rng.choice(np.arange(0, 7583), VIDEOS, replace=False))
    author = rng.integers(0, AUTHORS, VIDEOS)
    author_ids = rng.choice(np.arange(0, 100000), AUTHORS, replace=False)
    is_ad = rng.random(VIDEOS) < 0.1
    duration = np.round(rng.gamma(2.0, 12000.0, VIDEOS) + 3000).astype(int)
    tags = [sorted(set(rng.integers(0, 30, rng.integers(1, 4)).tolist())) for _ in range(VIDEOS)]
    appeal = rng.normal(0, 0.8, (AUTHORS, 1 + len(RARE)))
    tag_appeal = rng.normal(0, 0.6, 30)
    with open(OUT / "video_features_basic_pure.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(VIDEO_HEADER)
        for v in range(VIDEOS):
            upload = date(2022, 4, 8) - timedelta(days=int(rng.integers(0, 400)))
            writer.writerow(
                [
                    video_ids[v],
                    author_ids[author[v]],
                    "AD" if is_ad[v] else "NORMAL",
                    upload.isoformat(),
                    rng.choice(["ShortImport", "LongImport", "Web", "PictureSet"], p=[0.7, 0.1, 0.1, 0.1]),
                    "public",
                    "" if rng.random() < 0.03 else f"{duration[v]:.1f}",  # blank in a few rows, as published
                    rng.choice([720, 1080]),
                    rng.choice([1280, 1920]),
                    int(rng.integers(0, 3000000)),
                    rng.choice([9, 4, 8]),
                    ",".join(str(t) for t in tags[v]),
                ]
            )

    for name, (first, last, rows) in LOGS.items():
        days = (last - first).days + 1
        u = rng.integers(0, USERS, rows)
        v = rng.integers(0, VIDEOS, rows)
        day = np.sort(rng.integers(0, days, rows))
        minute = rng.integers(0, 24 * 60, rows)
        tab = rng.choice([0, 1, 2, 4, 6], rows, p=[0.5, 0.2, 0.1, 0.1, 0.1])
        tag_effect = np.array([tag_appeal[tags[x]].mean() for x in v])
        click_logit = -0.4 + user_taste[u, 0] + appeal[author[v], 0] + tag_effect + 0.5 * (tab == 1) - 1.0 * is_ad[v]
        click = (rng.random(rows) < 1 / (1 + np.exp(-click_logit))).astype(int)
        # watch ratio: clicked videos and engaged users watch more of it; short videos are finished more often
        ratio = rng.gamma(2.0, 0.3, rows) * np.exp(0.3 * user_taste[u, 0] + 0.4 * click)
        ratio *= np.where(duration[v] < 15000, 1.5, 0.8)
        play = np.round(np.minimum(ratio, 4.0) * duration[v]).astype(int)
        long_view = np.where(duration[v] <= 18000, play >= duration[v], play >= 18000).astype(int)
        rare = {}
        for k, (signal, rate) in enumerate(RARE.items(), start=1):
            logit = np.log(rate / (1 - rate)) + user_taste[u, k] + appeal[author[v], k] + 0.8 * long_view
            rare[signal] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
        profile_enter = (rng.random(rows) < 0.05 + 0.1 * rare["is_follow"]).astype(int)
        with open(OUT / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(LOG_HEADER)
            for i in range(rows):
                when = datetime(first.year, first.month, first.day) + timedelta(
                    days=int(day[i]), minutes=int(minute[i])
                )
                values = {
                    "user_id": user_ids[u[i]],
                    "video_id": video_ids[v[i]],
                    "date": when.strftime("%Y%m%d"),
                    "hourmin": when.hour * 100,  # the published hourmin keeps the hour (1500 is 15:00)
                    "time_ms": f"{int(when.timestamp() * 1000) + int(rng.integers(0, 60000))}",
                    "is_click": click[i],
                    "long_view": long_view[i],
                    "play_time_ms": play[i],
                    "duration_ms": duration[v[i]],
                    "profile_stay_time": int(profile_enter[i] * rng.integers(1000, 30000)),
                    "comment_stay_time": int(rare["is_comment"][i] * rng.integers(1000, 60000)),
                    "is_profile_enter": profile_enter[i],
                    "is_rand": 0,
                    "tab": tab[i],
                }
                values.update({signal: rare[signal][i] for signal in RARE})
                writer.writerow([values[c] for c in LOG_HEADER])
    print(f"wrote {sum(r for *_, r in LOGS.values())} log rows, {USERS} users and {VIDEOS} videos to {OUT}")


if __name__ == "__main__":
    main()
