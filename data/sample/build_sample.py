#!/usr/bin/env python3
"""Builds data/sample/{images/,gender.csv,category.csv} from the unpacked npm packages.

Usage (see README.md):
  mkdir -p /tmp/emoji && cd /tmp/emoji
  npm pack emoji-datasource-twitter@16.0.0 emoji-datasource@16.0.0
  mkdir tw ds && tar xzf emoji-datasource-twitter-16.0.0.tgz -C tw \
    && tar xzf emoji-datasource-16.0.0.tgz -C ds
  python data/sample/build_sample.py /tmp/emoji/tw/package [/tmp/emoji/ds/package]

The first argument is the unpacked `emoji-datasource-twitter` package (its img/twitter/64/ PNGs
are copied); the optional second one is the unpacked `emoji-datasource` package whose emoji.json
supplies the names/categories (by default the twitter package's own emoji.json, which is the
same file). Standard library only; deterministic (no randomness: subsampling takes evenly spaced
items in Unicode sort order).
"""

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- gender manifest -----------------------------------------------------------------------
N_GENDER_PAIRS = 24          # man/woman pairs kept (whole groups; ~6 images per group)
GENDER_SUBCATEGORIES = {"person", "person-gesture", "person-activity", "person-role",
                        "person-fantasy", "person-resting", "person-sport"}
# Gender is the name's MAN/WOMAN, but these are not visually "clearly" that gender (or the
# other member of the pair is not), so both members of the pair are dropped.
AMBIGUOUS_NAMES = {"WOMAN: BEARD", "MAN WITH VEIL", "WOMAN IN TUXEDO", "PREGNANT MAN"}

# ---- category manifest ---------------------------------------------------------------------
CATEGORY_CAP = 45            # images per class at most
CATEGORY_CLASSES = {         # class name -> emoji.json subcategories
    "mammal": {"animal-mammal"},
    "transport_ground": {"transport-ground"},
    "sky_weather": {"sky & weather"},
    "clothing": {"clothing"},
    "fruit_vegetable": {"food-fruit", "food-vegetable"},
    "face": {"face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical",
             "face-sleepy", "face-unwell", "face-hat", "face-glasses", "face-concerned",
             "face-negative"},
}

# MAN / WOMAN and their hair-style variants ("MAN: CURLY HAIR", "WOMAN: BLOND HAIR", ...) share
# most of their pixels (Twemoji's 1F469-1F3FC WOMAN is byte-identical to WOMAN: BLOND HAIR with
# the same tone), so they all get the base emoji's group.
HAIR_VARIANT = re.compile(r"^(MAN|WOMAN)(: .*)?$")
HAIR_GROUP = {"MAN": "1f468", "WOMAN": "1f469"}

SKIN_TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def evenly_spaced(items, n):
  """n items at evenly spaced positions (deterministic, keeps order)."""
  if len(items) <= n:
    return list(items)
  return [items[(i * len(items)) // n] for i in range(n)]


def images_of(entry, img_dir):
  """(image file name, skin tone or '') of an entry and its single-skin-tone variations."""
  out = []
  if entry.get("has_img_twitter") and os.path.exists(os.path.join(img_dir, entry["image"])):
    out.append((entry["image"], ""))
  for tone, var in sorted((entry.get("skin_variations") or {}).items()):
    if tone not in SKIN_TONES:  # two-person emoji have 2-tone keys like "1F3FB-1F3FC"
      continue
    if var.get("has_img_twitter") and os.path.exists(os.path.join(img_dir, var["image"])):
      out.append((var["image"], tone))
  return out


def gender_rows(emoji, img_dir):
  unified = {e["unified"] for e in emoji}
  by_key = {}
  for e in sorted(emoji, key=lambda e: e["sort_order"]):
    name = (e["name"] or "").upper()
    if e["category"] != "People & Body" or e["subcategory"] not in GENDER_SUBCATEGORIES:
      continue
    tokens = re.split(r"[^A-Z]+", name)
    genders = [t for t in tokens if t in ("MAN", "WOMAN")]
    if len(genders) != 1 or {"MEN", "WOMEN"} & set(tokens):
      continue
    if "FACING RIGHT" in name or name in AMBIGUOUS_NAMES:  # mirrored copies / ambiguous
      continue
    # Gender-neutral bases whose old name still says MAN/WOMAN (e.g. 1F473 "MAN WITH TURBAN" is
    # PERSON WEARING TURBAN; its gendered forms are the ...-200D-2640/2642-FE0F sequences).
    if e["unified"] + "-200D-2640-FE0F" in unified or e["short_name"].startswith("person"):
      continue
    key = " ".join("*" if t in ("MAN", "WOMAN") else t for t in tokens if t)
    by_key.setdefault(key, {})[genders[0].lower()] = e
  pairs = [(k, v) for k, v in by_key.items() if set(v) == {"man", "woman"}]
  pairs.sort(key=lambda kv: kv[1]["man"]["sort_order"])
  chosen = evenly_spaced(pairs, N_GENDER_PAIRS)
  rows, seen = [], set()
  for _, pair in chosen:
    for gender in ("man", "woman"):
      e = pair[gender]
      m = HAIR_VARIANT.match(e["name"].upper())
      group = HAIR_GROUP[m.group(1)] if m else e["unified"].lower()
      for image, _ in images_of(e, img_dir):
        with open(os.path.join(img_dir, image), "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
        if digest in seen:  # byte-identical to an image already listed: drop it
          continue
        seen.add(digest)
        rows.append({"image_url": "images/" + image, "gender": gender, "group": group,
                     "_name": e["name"]})
  return rows, len(pairs)


def category_rows(emoji, img_dir):
  rows = []
  for label, subcats in CATEGORY_CLASSES.items():
    entries = sorted((e for e in emoji if e["subcategory"] in subcats),
                     key=lambda e: e["sort_order"])
    items = []
    for e in entries:
      for image, _ in images_of(e, img_dir):
        items.append({"image_url": "images/" + image, "category": label,
                      "group": e["unified"].lower(), "_name": e["name"]})
    rows.extend(evenly_spaced(items, CATEGORY_CAP))
  return rows


def write_csv(path, rows, columns):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
      w.writerow([r[c] for c in columns])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("twitter_pkg", help="unpacked emoji-datasource-twitter package directory")
  p.add_argument("datasource_pkg", nargs="?", help="unpacked emoji-datasource package directory "
                 "(emoji.json); default: the twitter package's emoji.json")
  p.add_argument("--out", default=HERE, help="output directory (default: this script's folder)")
  args = p.parse_args(argv)

  img_dir = os.path.join(args.twitter_pkg, "img", "twitter", "64")
  with open(os.path.join(args.datasource_pkg or args.twitter_pkg, "emoji.json")) as f:
    emoji = json.load(f)

  g_rows, n_pairs = gender_rows(emoji, img_dir)
  c_rows = category_rows(emoji, img_dir)

  out_img = os.path.join(args.out, "images")
  if os.path.isdir(out_img):
    shutil.rmtree(out_img)
  os.makedirs(out_img)
  for r in g_rows + c_rows:
    shutil.copyfile(os.path.join(img_dir, os.path.basename(r["image_url"])),
                    os.path.join(args.out, r["image_url"]))
  write_csv(os.path.join(args.out, "gender.csv"), g_rows, ["image_url", "gender", "group"])
  write_csv(os.path.join(args.out, "category.csv"), c_rows, ["image_url", "category", "group"])

  def summary(rows, col):
    counts = {}
    for r in rows:
      c = counts.setdefault(r[col], [0, set()])
      c[0] += 1
      c[1].add(r["group"])
    return ", ".join(f"{k}: {v[0]} images / {len(v[1])} groups" for k, v in sorted(counts.items()))

  print(f"gender.csv: {len(g_rows)} rows ({N_GENDER_PAIRS} of {n_pairs} man/woman pairs) -- "
        + summary(g_rows, "gender"))
  print(f"category.csv: {len(c_rows)} rows -- " + summary(c_rows, "category"))
  print(f"images/: {len(os.listdir(out_img))} files")
  return 0


if __name__ == "__main__":
  sys.exit(main())
