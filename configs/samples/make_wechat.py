"""Write the generated sample of configs/wechat2021.yaml: configs/samples/wechat2021/{user_action,feed_info}.csv.

It imitates the file layout of the WeChat Big Data Challenge 2021 (WBDC 2021, WeChat Channels short-video
feed; preliminary round data, ``wechat_algo_data1/``): ``user_action.csv`` (one row per user x feed
impression, days ``date_`` 1-14, seven action labels) and ``feed_info.csv`` (one row per feed), with the
published column names, order and cell formats (space-separated word ids, ``;``-separated keyword and
tag lists, ``tag probability`` pairs in ``machine_tag_list``, blank background-music ids).

NO ROW OF IT IS REAL: users, feeds and actions are drawn at random (seeded), with action probabilities
that depend on the user, the author, the device, the video's length and its tags, so a model has something
to learn; the action rates are raised well above the real ones (forward is about 0.4% of impressions in
the real data) so that a few thousand rows hold positives of every action in every split. No number
measured on this sample is a result on the real data set.

    python configs/samples/make_wechat.py        # rewrites the two files (deterministic)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "wechat2021"
USERS, FEEDS, AUTHORS, ROWS, DAYS = 60, 300, 40, 5000, 14
ACTIONS = ["read_comment", "comment", "like", "click_avatar", "forward", "follow", "favorite"]
# base rate of each action in the sample (raised, see above), and how strongly the feed's tags move it
BASE = {
    "read_comment": 0.15,
    "comment": 0.04,
    "like": 0.12,
    "click_avatar": 0.08,
    "forward": 0.05,
    "follow": 0.04,
    "favorite": 0.05,
}
ACTION_HEADER = ["userid", "feedid", "date_", "device"] + ACTIONS[:3] + ["play", "stay"] + ACTIONS[3:]
FEED_HEADER = [
    "feedid",
    "authorid",
    "videoplayseconds",
    "description",
    "ocr",
    "asr",
    "bgm_song_id",
    "bgm_singer_id",
    "manual_keyword_list",
    "machine_keyword_list",
    "manual_tag_list",
    "machine_tag_list",
    "description_char",
    "ocr_char",
    "asr_char",
]


def _words(rng: np.random.Generator, vocab: int, low: int, high: int) -> str:
    """A blank-separated run of word ids (blank in about one cell in ten, as in the real text fields)."""
    if rng.random() < 0.1:
        return ""
    return " ".join(str(w) for w in rng.integers(1, vocab, rng.integers(low, high)))


def main() -> None:
    rng = np.random.default_rng(2021)
    OUT.mkdir(parents=True, exist_ok=True)

    # feeds: an author, a length in seconds, 1-3 manual tags; each author and tag has a hidden appeal per action
    feed_ids = rng.choice(np.arange(1, 110000), FEEDS, replace=False)
    author = rng.integers(0, AUTHORS, FEEDS)
    author_ids = rng.choice(np.arange(1, 20000), AUTHORS, replace=False)
    seconds = np.clip(rng.gamma(2.0, 15.0, FEEDS).astype(int) + 5, 5, 60)
    tags = [sorted(set(rng.integers(1, 30, rng.integers(1, 4)).tolist())) for _ in range(FEEDS)]
    author_appeal = rng.normal(0, 1.0, (AUTHORS, len(ACTIONS)))
    tag_appeal = rng.normal(0, 0.8, (30, len(ACTIONS)))
    feed_rows = []
    for f in range(FEEDS):
        has_bgm = rng.random() < 0.7
        machine_tags = ";".join(f"{t} {rng.uniform(0.2, 0.99):.6f}" for t in tags[f])
        feed_rows.append(
            [
                feed_ids[f],
                author_ids[author[f]],
                seconds[f],
                _words(rng, 150000, 5, 30),
                _words(rng, 150000, 0, 20),
                _words(rng, 150000, 0, 20),
                f"{rng.integers(1, 25000)}.0" if has_bgm else "",  # pandas wrote these float ids with gaps
                f"{rng.integers(1, 18000)}.0" if has_bgm else "",
                ";".join(str(k) for k in rng.integers(1, 27000, rng.integers(0, 5))),
                ";".join(str(k) for k in rng.integers(1, 27000, rng.integers(0, 5))),
                ";".join(str(t) for t in tags[f]),
                machine_tags,
                _words(rng, 33000, 10, 60),
                _words(rng, 33000, 0, 40),
                _words(rng, 33000, 0, 40),
            ]
        )
    with open(OUT / "feed_info.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(FEED_HEADER)
        writer.writerows(feed_rows)

    # impressions: a user (with a hidden taste per action) sees a feed on a day, on device 1 or 2
    user_ids = rng.choice(np.arange(1, 250000), USERS, replace=False)
    user_taste = rng.normal(0, 1.0, (USERS, len(ACTIONS)))
    user_device = rng.integers(1, 3, USERS)
    u = rng.integers(0, USERS, ROWS)
    f = rng.integers(0, FEEDS, ROWS)
    day = np.sort(rng.integers(1, DAYS + 1, ROWS))
    device = np.where(rng.random(ROWS) < 0.9, user_device[u], 3 - user_device[u])
    short = (seconds[f] < 20).astype(float)
    tag_effect = np.stack([tag_appeal[tags[fi]].mean(axis=0) for fi in f])
    labels = {}
    for a, action in enumerate(ACTIONS):
        base = np.log(BASE[action] / (1 - BASE[action]))
        logit = base + user_taste[u, a] + author_appeal[author[f], a] + tag_effect[:, a]
        logit += 0.4 * (device == 2) - 0.3 * short
        labels[action] = (rng.random(ROWS) < 1 / (1 + np.exp(-logit))).astype(int)
    # play and stay in milliseconds: engaged impressions are watched longer
    engaged = labels["like"] + labels["read_comment"] + labels["forward"]
    play = (seconds[f] * 1000 * np.clip(rng.beta(2, 2, ROWS) + 0.3 * engaged, 0, 3)).astype(int)
    stay = play + rng.integers(0, 4000, ROWS)
    with open(OUT / "user_action.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(ACTION_HEADER)
        for i in range(ROWS):
            values = {"userid": user_ids[u[i]], "feedid": feed_ids[f[i]], "date_": day[i], "device": device[i]}
            values.update({a: labels[a][i] for a in ACTIONS})
            values.update(play=play[i], stay=stay[i])
            writer.writerow([values[c] for c in ACTION_HEADER])
    print(f"wrote {ROWS} actions and {FEEDS} feeds to {OUT}")


if __name__ == "__main__":
    main()
