"""Write the vision demo's data (examples/vision/): rendered shapes, asked their colour or count.

Each image is a 56x56 canvas (the bundled tiny-vlm's largest size) holding 1 to 3 shapes of one
kind (circle, square, triangle) and one colour (red, green, blue, yellow); its record asks one
question, "What colour are the shapes?" (answer: the colour) or "How many shapes are there?"
(answer: the count). Train and held-out sets are drawn with different seeds, and a held-out
image whose pixels equal a training image's is drawn again, so no held-out image was trained on.

    python scripts/make_vision_data.py [--out examples/vision] [--train 320] [--heldout 64]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 56
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour are the shapes?", "count": "How many shapes are there?"}
CELL = SIZE // 3  # shapes sit in distinct cells of a 3x3 grid, so they never overlap


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple, fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(rng: random.Random) -> tuple[Image.Image, str, int]:
    """(image, colour name, count): 1-3 same shapes in random cells, random sizes."""
    colour, kind, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for cell in rng.sample(range(9), count):
        side = rng.randint(10, CELL - 2)
        x = (cell % 3) * CELL + rng.randint(0, CELL - side)
        y = (cell // 3) * CELL + rng.randint(0, CELL - side)
        draw_shape(draw, kind, (x, y, x + side - 1, y + side - 1), COLOURS[colour])
    return image, colour, count


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def records(split: str, n: int, seed: int, out: Path, seen: set[str]) -> list[dict]:
    """n records of `split`, images written under out/images/; `seen` holds pixel hashes."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        image, colour, count = render(rng)
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        name = f"images/{split}_{len(rows):03d}.png"
        (out / name).write_bytes(png_bytes(image))
        kind = rng.choice(list(QUESTIONS))
        answer = colour if kind == "colour" else str(count)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": name},
                                         {"type": "text", "text": QUESTIONS[kind]}]},
            {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/vision")
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--heldout", type=int, default=64)
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    write_jsonl(out / "train.jsonl", records("train", args.train, 1, out, seen))
    write_jsonl(out / "heldout.jsonl", records("heldout", args.heldout, 2, out, seen))
    print(f"{out}: {args.train} training and {args.heldout} held-out records")


if __name__ == "__main__":
    main()
