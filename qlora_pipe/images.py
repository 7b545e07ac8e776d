"""Image data of the diffusion tasks: captioned images (an image folder with metadata.jsonl, or a hub data set) or
DreamBooth instance images with one prompt, checked image by image before training, and turned into training tensors
(resize, crop, flip, normalise) as diffusers' LoRA training scripts do.

The checks read every image once: an unreadable file, a mode whose conversion to RGB would lose its values (16-bit or
float), or a picture so small that it would be upscaled more than twice is reported by file, all of them together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qlora_pipe import UserError
from qlora_pipe.config import Recipe
from qlora_pipe.rows import hub_table, is_local

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
# Modes whose convert("RGB") keeps the picture. I, I;16 and F (16-bit and float) are clipped to 0..255 by it.
RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV")
# A picture whose shorter side is below resolution / MAX_UPSCALE would be blown up into blur.
MAX_UPSCALE = 2
SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class HubImage:
    """Row `row` of a hub data set's image column, decoded when it is read (a data set of large pictures would not fit
    in memory decoded)."""

    table: object
    row: int
    column: str

    def load(self) -> Image.Image:
        return self.table[self.row][self.column]


@dataclass
class Example:
    """One training image and its prompt; `where` names it in messages (file, or data set row)."""

    image: Path | HubImage
    text: str
    where: str


def load_image(example: Example) -> Image.Image:
    """The picture as stored (its own mode), read whole."""
    image = Image.open(example.image) if isinstance(example.image, Path) else example.image.load()
    if isinstance(image, Image.Image):
        image.load()
    return image


def read_examples(recipe: Recipe) -> tuple[list[Example], dict]:
    """The training examples the recipe names, and where they came from (for the manifest). User errors name the
    metadata line, the missing file or the column."""
    d, g = recipe.data, recipe.diffusion
    source = d.train
    if recipe.task == "dreambooth":
        if is_local(source):
            examples = instance_folder(Path(source), g.instance_prompt)
        else:
            examples = hub_examples(source, d.columns, text_column=False, prompt=g.instance_prompt)
    elif is_local(source):
        examples = metadata_folder(Path(source), d.columns)
    else:
        examples = hub_examples(source, d.columns, text_column=True)
    if not examples:
        raise UserError(f"data.train: {source} holds no images")
    facts = {"train": source, "images": len(examples)}
    if is_local(source) and (Path(source) / METADATA).exists():
        facts["metadata_sha256"] = _sha256(Path(source) / METADATA)
    return examples, facts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def instance_folder(folder: Path, prompt: str) -> list[Example]:
    if not folder.is_dir():
        missing = "is not a folder" if folder.exists() else "not found"
        raise UserError(f"data.train: {folder} {missing}; dreambooth reads a folder of instance images")
    return [Example(p, prompt, str(p)) for p in image_files(folder)]


def metadata_folder(folder: Path, columns: dict[str, str] | None) -> list[Example]:
    """The datasets `imagefolder` layout: images and metadata.jsonl with one {file_name, text} object per line."""
    if not folder.is_dir():
        raise UserError(
            f"data.train: {folder} {'is not a folder' if folder.exists() else 'not found'}; text_to_image reads an "
            f"image folder with {METADATA} (file_name, text) or a hub image data set"
        )
    metadata = folder / METADATA
    if not metadata.is_file():
        raise UserError(
            f"data.train: {folder} has no {METADATA}; add one line per image: "
            '{"file_name": "0001.png", "text": "its caption"}'
        )
    name_key, text_key = (columns or {}).get("file_name", "file_name"), (columns or {}).get("text", "text")
    examples, problems = [], []
    for number, line in enumerate(metadata.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get(name_key), str):
            problems.append(f"{where}: needs a `{name_key}` string")
            continue
        if not isinstance(row.get(text_key), str):
            problems.append(f"{where}: needs a `{text_key}` caption string (map another column with data.columns)")
            continue
        path = folder / row[name_key]
        if not path.is_file():
            problems.append(f"{where}: {row[name_key]} is not in {folder}")
            continue
        examples.append(Example(path, row[text_key], str(path)))
    if problems:
        raise UserError(_listed(f"{len(problems)} problems in {metadata}", problems))
    return examples


def hub_examples(name: str, columns: dict[str, str] | None, *, text_column: bool, prompt: str = "") -> list[Example]:
    """A hub image data set (from the local cache when offline): the `image` column, and a `text` caption column or
    one prompt for every row."""
    table = hub_table(name, "data.train", "image folder")
    image_key, text_key = (columns or {}).get("image", "image"), (columns or {}).get("text", "text")
    wanted = [image_key, text_key] if text_column else [image_key]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise UserError(
            f"data.train: {name} has no column {', '.join(missing)} (it has {', '.join(table.column_names)}); map "
            "its columns with data.columns, e.g. {image: img, text: caption}"
        )
    texts = table[text_key] if text_column else [prompt] * len(table)
    return [Example(HubImage(table, i, image_key), texts[i], f"{name}: row {i + 1}") for i in range(len(table))]


def image_problem(example: Example, resolution: int) -> tuple[str | None, int]:
    """Why an image cannot be trained on (or None), and its shorter side."""
    try:
        image = load_image(example)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})", 0
    if not isinstance(image, Image.Image):
        return f"not an image (a {type(image).__name__})", 0
    if image.mode not in RGB_MODES:
        return f"mode {image.mode} (16-bit or float pixels); save it as 8-bit RGB", 0
    if min(image.size) * MAX_UPSCALE < resolution:
        return (
            f"{image.size[0]}x{image.size[1]} is too small for diffusion.resolution {resolution} (the shorter side "
            f"must be at least {-(-resolution // MAX_UPSCALE)})"
        ), 0
    return None, min(image.size)


def check_images(examples: list[Example], resolution: int, what: str = "data.train") -> dict:
    """Read every image; refuse the data, naming each bad one, if any is bad. Returns the report."""
    from tqdm.auto import tqdm

    problems, sizes = [], []
    for example in tqdm(examples, desc=f"checking {what} images", unit="image", leave=False):
        problem, side = image_problem(example, resolution)
        if problem:
            problems.append(f"{example.where}: {problem}")
        else:
            sizes.append(side)
    if problems:
        raise UserError(_listed(f"{what}: {len(problems)} of {len(examples)} images cannot be trained on", problems))
    return {"images": len(examples), "shorter_side_min": min(sizes), "shorter_side_max": max(sizes)}


def _listed(head: str, problems: list[str]) -> str:
    more = len(problems) - SHOWN_PROBLEMS
    return head + ":\n  " + "\n  ".join(problems[:SHOWN_PROBLEMS]) + (f"\n  ... and {more} more" if more > 0 else "")


def to_tensor(
    image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bilinear), crop a square (centre or random), maybe flip, scale to
    [-1, 1]: the transforms of diffusers' training scripts, the random choices drawn from `generator`."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(w - resolution + 1, (), generator=generator).item())
        top = int(torch.randint(h - resolution + 1, (), generator=generator).item())
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand((), generator=generator).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


class ImageTextDataset(torch.utils.data.Dataset):
    """Training items {pixel_values, input_ids, prior, noise, posterior_noise, timestep}; for DreamBooth with prior
    preservation each item pairs an instance image with a class image (the collator puts the instance images
    first), and the length is the larger of the two sets, as in diffusers' DreamBooth script.

    Everything random about a sample (crop, flip, the noise added to its latents, its timestep, the sample of the
    VAE's latent distribution) is drawn from a generator of its own, seeded by (seed, epoch, index), not from the
    global RNG: the data loader fetches a batch ahead of the step that trains on it (draws from the global stream
    would land on the other side of a checkpoint's RNG state), and a sample's draws must not depend on which rank,
    batch or micro-batch it falls in. So a resumed run, and N ranks with batch b, train what one uninterrupted
    process with batch N·b trains. `draws`: the latent shape and timestep count (diffusion.latent_draws); `epoch`
    is set by the trainer (train_diffusion.DrawEpoch) before each epoch's first batch is fetched."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        recipe: Recipe,
        draws: dict,
        class_examples: list[Example] | None = None,
    ):
        self.examples, self.class_examples, self.draws = examples, class_examples or [], draws
        self.tokenizer, self.g, self.seed, self.epoch = tokenizer, recipe.diffusion, recipe.train.seed, 0

    def __len__(self) -> int:
        return max(len(self.examples), len(self.class_examples))

    def item(self, example: Example, index: int, prior: bool) -> dict:
        g = self.g
        ids = self.tokenizer(
            example.text, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True
        ).input_ids
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, prior)) % 2**63)
        pixels = to_tensor(load_image(example).convert("RGB"), g.resolution, g.center_crop, g.random_flip, generator)
        shape = self.draws["shape"]
        return {
            "pixel_values": pixels,
            "input_ids": torch.tensor(ids),
            "prior": torch.tensor(prior),
            "noise": torch.randn(shape, generator=generator),
            "posterior_noise": torch.randn(shape, generator=generator),
            "timestep": torch.randint(self.draws["timesteps"], (), generator=generator),
        }

    def __getitem__(self, i: int) -> dict:
        items = [self.item(self.examples[i % len(self.examples)], i, False)]
        if self.class_examples:
            items.append(self.item(self.class_examples[i % len(self.class_examples)], i, True))
        return {"items": items}


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Instance images first, then class images (DreamBooth), as one batch."""
    items = [pair[0] for pair in (b["items"] for b in batch)]
    items += [b["items"][1] for b in batch if len(b["items"]) > 1]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
