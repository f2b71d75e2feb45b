"""The synthetic world: a scene sampler, a renderer and caption writers.

A scene is a few objects of one shape and colour, of one size, on a textured background. The
same library draws the synthetic pool (with web-like noise, `synth.py`), the clean reference set,
and the held-out tiny evaluation suite, so all three come from one visual world. Everything is a
pure function of a numpy Generator, so a seed fixes every pixel and every word.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon", "crescent", "arrow")
SHAPE_PLURALS = dict(
    zip(
        SHAPES,
        (
            "circles",
            "squares",
            "triangles",
            "stars",
            "crosses",
            "diamonds",
            "rings",
            "hexagons",
            "crescents",
            "arrows",
        ),
    )
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 55),
    "blue": (35, 75, 215),
    "purple": (130, 45, 175),
    "pink": (245, 125, 185),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "gradient", "speckled")
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (225, 205, 165),
    "navy": (25, 35, 90),
    "teal": (30, 120, 120),
    "olive": (110, 115, 40),
    "lavender": (190, 175, 225),
    "cream": (250, 245, 220),
    "charcoal": (55, 55, 60),
}
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
COUNT_WORDS = ("one", "two", "three", "four")
STYLES = ("flat", "outline")
MAX_COUNT = len(COUNT_WORDS)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    size: str
    position: str  # where a single object sits; "scattered" for several
    background: str
    bg_colour: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, MAX_COUNT + 1))
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        count=count,
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)) if count == 1 else "scattered",
        background=str(rng.choice(BACKGROUNDS)),
        bg_colour=str(rng.choice(list(BACKGROUND_COLOURS))),
    )


# --------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 3


def _regular_polygon(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.42
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _regular_polygon(3, -math.pi / 2),
    "star": _star(),
    "cross": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    "diamond": [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)],
    "hexagon": _regular_polygon(6),
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)],
}


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, outline: int
) -> None:
    """Draw one object (value 255) on a mask; `outline` > 0 draws only the contour that wide."""
    fill, width = (None, outline) if outline else (255, 0)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=255, width=width)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(outline, int(r * 0.45)))
    elif shape == "crescent":
        draw.ellipse(box, fill=fill, outline=255, width=width)
        dx = r * 0.5 * math.cos(angle)
        dy = r * 0.5 * math.sin(angle)
        draw.ellipse((cx - r * 0.85 + dx, cy - r * 0.85 + dy, cx + r * 0.85 + dx, cy + r * 0.85 + dy), fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _POLYGONS[shape]]
        if outline:
            draw.line([*points, points[0]], fill=255, width=outline, joint="curve")
        else:
            draw.polygon(points, fill=255)


def _jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)


def render_background(rng: np.random.Generator, kind: str, bg_colour: str, width: int, height: int) -> np.ndarray:
    """A float32 HxWx3 background texture."""
    base = _jitter_colour(rng, BACKGROUND_COLOURS[bg_colour], 12)
    other = np.clip(base + (45 if base.mean() < 128 else -45), 0, 255)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.broadcast_to(base, (height, width, 3)).copy()
    if kind == "striped":
        period = rng.uniform(6, 12)
        direction = rng.choice([(1, 0), (0, 1), (1, 1), (1, -1)])
        mask = ((xs * direction[0] + ys * direction[1]) // (period / 2)) % 2 == 1
        image[mask] = other
    elif kind == "dotted":
        period = rng.uniform(7, 11)
        radius = period * rng.uniform(0.18, 0.3)
        ox, oy = rng.uniform(0, period, 2)
        mask = ((xs + ox) % period - period / 2) ** 2 + ((ys + oy) % period - period / 2) ** 2 < radius**2
        image[mask] = other
    elif kind == "checkered":
        period = rng.uniform(8, 16)
        mask = ((xs // period) + (ys // period)) % 2 == 1
        image[mask] = other
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = base + t[..., None] * (other - base) * 1.6
    elif kind == "speckled":
        image = image + rng.normal(0, 28, (height, width, 1))
    image += rng.normal(0, 3, image.shape)  # sensor-like noise on every background
    return np.clip(image, 0, 255).astype(np.float32)


def _object_centres(
    rng: np.random.Generator, scene: Scene, width: int, height: int, radius: float
) -> list[tuple[float, float]]:
    """Object centres inside the image's central square, which is what a centre crop keeps."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    margin = radius * 1.05
    if scene.count == 1:
        fx, fy = {
            "center": (0.5, 0.5),
            "left": (0.25, 0.5),
            "right": (0.75, 0.5),
            "top": (0.5, 0.25),
            "bottom": (0.5, 0.75),
        }[scene.position]
        cx = float(np.clip(fx * side + rng.normal(0, side * 0.03), margin, side - margin))
        cy = float(np.clip(fy * side + rng.normal(0, side * 0.03), margin, side - margin))
        return [(x0 + cx, y0 + cy)]
    centres: list[tuple[float, float]] = []
    for _ in range(scene.count):
        best, best_gap = (0.0, 0.0), -1.0
        for _ in range(12):  # keep the candidate farthest from the objects already placed
            candidate = (
                x0 + float(rng.uniform(margin, side - margin)),
                y0 + float(rng.uniform(margin, side - margin)),
            )
            gap = min((math.dist(candidate, c) for c in centres), default=1e9)
            if gap > best_gap:
                best, best_gap = candidate, gap
            if gap > 2.2 * radius:
                break
        centres.append(best)
    return centres


def render_scene(
    rng: np.random.Generator, scene: Scene, width: int = 64, height: int = 64, style: str = "flat"
) -> Image.Image:
    """Draw `scene`; `style` "outline" draws contours only (the tiny suite's distribution shift)."""
    background = render_background(rng, scene.background, scene.bg_colour, width, height)
    scale = min(width, height) * (0.15 if scene.size == "small" else 0.24) * (1.0 if scene.count < 3 else 0.85)
    radius = max(scale * rng.uniform(0.9, 1.1), min(4.0, min(width, height) / 4))
    s = _SUPERSAMPLE
    mask = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(mask)
    outline = max(2, int(radius * s * 0.18)) if style == "outline" else 0
    for cx, cy in _object_centres(rng, scene, width, height, radius):
        _draw_shape(draw, scene.shape, cx * s, cy * s, radius * s, float(rng.uniform(-0.3, 0.3)), outline)
    alpha = np.asarray(mask.resize((width, height), Image.BOX), dtype=np.float32)[..., None] / 255.0
    colour = _jitter_colour(rng, COLOURS[scene.colour], 18)
    if style == "outline":  # a sketch: washed-out background, coloured strokes
        background = (30 if colour.mean() > 190 else 200) + background * 0.2
    image = background * (1 - alpha) + colour * alpha
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


OFF_DOMAIN_KINDS = ("field", "document", "landscape")
BLANK_KINDS = ("blank", "noise")


def render_off_domain(rng: np.random.Generator, kind: str, width: int = 64, height: int = 64) -> Image.Image:
    """An image from outside the world: a smooth colour field, a document-like page or a landscape."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "field":
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    elif kind == "document":
        image = np.full((height, width, 3), rng.uniform(225, 255), dtype=np.float32)
        row = int(rng.integers(4, 9))
        for y in range(row, height - 4, row):
            x1 = int(rng.uniform(0.5, 0.95) * width)
            image[y : y + max(1, row // 3), 4:x1] = rng.uniform(20, 90)
    else:
        horizon = rng.uniform(0.45, 0.75) * height
        sky = np.array([rng.uniform(90, 170), rng.uniform(140, 200), 255.0])
        ground = np.array([rng.uniform(40, 110), rng.uniform(90, 150), rng.uniform(20, 60)])
        image = np.where((ys < horizon)[..., None], sky * (0.7 + 0.3 * ys[..., None] / horizon), ground)
        sun = (xs - rng.uniform(0.2, 0.8) * width) ** 2 + (ys - horizon * 0.4) ** 2 < (0.08 * width) ** 2
        image[sun] = (255, 230, 120)
    image = image + rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def render_blank_or_noise(rng: np.random.Generator, kind: str, width: int = 64, height: int = 64) -> Image.Image:
    """A blank (one flat colour) or pure-noise image."""
    if kind == "blank":
        colour = rng.integers(0, 256, 3)
        image = np.broadcast_to(colour, (height, width, 3)) + rng.normal(0, 1.5, (height, width, 3))
    else:
        image = rng.integers(0, 256, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _phrase(scene: Scene, with_size: bool) -> str:
    """'two small red stars' / 'a red star'."""
    size = f"{scene.size} " if with_size else ""
    if scene.count == 1:
        return _a(f"{size}{scene.colour} {scene.shape}")
    return f"{COUNT_WORDS[scene.count - 1]} {size}{scene.colour} {SHAPE_PLURALS[scene.shape]}"


def _background_phrase(scene: Scene) -> str:
    """'an olive checkered background' / 'a plain grey background'."""
    pattern = "plain " if scene.background == "plain" else ""
    texture = "" if scene.background == "plain" else f" {scene.background}"
    return _a(f"{pattern}{scene.bg_colour}{texture} background")


_TEMPLATES = (
    lambda s, p, b: f"a photo of {p}",
    lambda s, p, b: f"{p} on {b}",
    lambda s, p, b: f"{p.capitalize()} against {b}.",
    lambda s, p, b: f"illustration of {p}",
    lambda s, p, b: f"{s.colour} {s.shape} clipart, {b}",
    lambda s, p, b: f"Stock image: {p} ({s.bg_colour} backdrop)",
    lambda s, p, b: f"my kid drew {p} today!",
    lambda s, p, b: f"vector graphic of {p} over {b}",
    lambda s, p, b: f"{s.colour.capitalize()} {s.shape} icon - free download",
    lambda s, p, b: f"sticker pack: {p}",
    lambda s, p, b: f"How to draw {p} - easy tutorial for beginners",
    lambda s, p, b: f"wallpaper with {p} on a {s.background} pattern",
    lambda s, p, b: f"{p}, {s.position} of the frame" if s.count == 1 else f"{p} scattered over the frame",
    lambda s, p, b: f"close-up of {p} | HD image",
    lambda s, p, b: f"{p.upper()}",
    lambda s, p, b: f"Geometric art print with {p}, {b}, 1920x1080",
)


def caption(rng: np.random.Generator, scene: Scene, template: int | None = None) -> str:
    """An English web-style caption that names the scene's shape, colour and count."""
    index = int(rng.integers(len(_TEMPLATES))) if template is None else template
    phrase = _phrase(scene, with_size=bool(rng.random() < 0.4))
    return _TEMPLATES[index](scene, phrase, _background_phrase(scene))


NUM_TEMPLATES = len(_TEMPLATES)

# shape (singular, plural) and colour words per language, in the order of SHAPES / COLOURS
_FOREIGN: dict[str, dict[str, Any]] = {
    "de": dict(
        shapes=[
            ("Kreis", "Kreise"),
            ("Quadrat", "Quadrate"),
            ("Dreieck", "Dreiecke"),
            ("Stern", "Sterne"),
            ("Kreuz", "Kreuze"),
            ("Raute", "Rauten"),
            ("Ring", "Ringe"),
            ("Sechseck", "Sechsecke"),
            ("Mondsichel", "Mondsicheln"),
            ("Pfeil", "Pfeile"),
        ],
        colours=["rot", "orange", "gelb", "grün", "blau", "lila", "rosa", "braun", "schwarz", "weiß"],
        counts=["ein", "zwei", "drei", "vier"],
        templates=[
            "Foto von {n} {shape} in der Farbe {colour} auf einem Hintergrund mit Muster",
            "{n} {shape} in {colour} – Bild kostenlos herunterladen",
            "Zeichnung für Kinder: {n} {shape}, Farbe {colour}, einfacher Hintergrund",
        ],
    ),
    "fr": dict(
        shapes=[
            ("cercle", "cercles"),
            ("carré", "carrés"),
            ("triangle", "triangles"),
            ("étoile", "étoiles"),
            ("croix", "croix"),
            ("losange", "losanges"),
            ("anneau", "anneaux"),
            ("hexagone", "hexagones"),
            ("croissant", "croissants"),
            ("flèche", "flèches"),
        ],
        colours=["rouge", "orange", "jaune", "vert", "bleu", "violet", "rose", "marron", "noir", "blanc"],
        counts=["un", "deux", "trois", "quatre"],
        templates=[
            "Photo de {n} {shape} de couleur {colour} sur un fond à motifs",
            "{n} {shape} {colour} – image gratuite à télécharger",
            "Dessin pour les enfants avec {n} {shape} de couleur {colour} sur un fond simple",
        ],
    ),
    "es": dict(
        shapes=[
            ("círculo", "círculos"),
            ("cuadrado", "cuadrados"),
            ("triángulo", "triángulos"),
            ("estrella", "estrellas"),
            ("cruz", "cruces"),
            ("rombo", "rombos"),
            ("anillo", "anillos"),
            ("hexágono", "hexágonos"),
            ("media luna", "medias lunas"),
            ("flecha", "flechas"),
        ],
        colours=["rojo", "naranja", "amarillo", "verde", "azul", "morado", "rosa", "marrón", "negro", "blanco"],
        counts=["un", "dos", "tres", "cuatro"],
        templates=[
            "Foto de {n} {shape} de color {colour} sobre un fondo con dibujos",
            "{n} {shape} de color {colour} - imagen gratis para descargar",
            "Dibujo para niños con {n} {shape} de color {colour} y un fondo sencillo",
        ],
    ),
    "it": dict(
        shapes=[
            ("cerchio", "cerchi"),
            ("quadrato", "quadrati"),
            ("triangolo", "triangoli"),
            ("stella", "stelle"),
            ("croce", "croci"),
            ("rombo", "rombi"),
            ("anello", "anelli"),
            ("esagono", "esagoni"),
            ("mezzaluna", "mezzelune"),
            ("freccia", "frecce"),
        ],
        colours=["rosso", "arancione", "giallo", "verde", "blu", "viola", "rosa", "marrone", "nero", "bianco"],
        counts=["un", "due", "tre", "quattro"],
        templates=[
            "Foto di {n} {shape} di colore {colour} su uno sfondo decorato",
            "{n} {shape} di colore {colour} - immagine gratuita da scaricare",
            "Disegno per bambini con {n} {shape} di colore {colour} e uno sfondo semplice",
        ],
    ),
    "pt": dict(
        shapes=[
            ("círculo", "círculos"),
            ("quadrado", "quadrados"),
            ("triângulo", "triângulos"),
            ("estrela", "estrelas"),
            ("cruz", "cruzes"),
            ("losango", "losangos"),
            ("anel", "anéis"),
            ("hexágono", "hexágonos"),
            ("lua crescente", "luas crescentes"),
            ("seta", "setas"),
        ],
        colours=["vermelho", "laranja", "amarelo", "verde", "azul", "roxo", "rosa", "marrom", "preto", "branco"],
        counts=["um", "dois", "três", "quatro"],
        templates=[
            "Foto de {n} {shape} na cor {colour} sobre um fundo com desenhos",
            "{n} {shape} na cor {colour} - imagem grátis para baixar",
            "Desenho para crianças com {n} {shape} na cor {colour} e um fundo simples",
        ],
    ),
}
LANGUAGES = tuple(_FOREIGN)


def foreign_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    """A caption of the scene in another language; returns (caption, language code)."""
    language = str(rng.choice(LANGUAGES))
    words = _FOREIGN[language]
    singular, plural = words["shapes"][SHAPES.index(scene.shape)]
    template = str(rng.choice(words["templates"]))
    text = template.format(
        n=words["counts"][scene.count - 1],
        shape=singular if scene.count == 1 else plural,
        colour=words["colours"][list(COLOURS).index(scene.colour)],
    )
    return text[0].upper() + text[1:], language


def boilerplate_caption(rng: np.random.Generator) -> str:
    """Alt text that says nothing about the image: file names, UI strings, placeholders."""
    n = int(rng.integers(1, 99999))
    options = (
        f"IMG_{n:04d}.JPG",
        f"DSC0{n:04d}.jpg",
        f"image{n}.png",
        f"untitled-{n % 100}.jpg",
        f"screenshot_2021-0{n % 9 + 1}-1{n % 10}.png",
        "click to enlarge",
        "view larger image",
        "image",
        "photo",
        "thumbnail",
        "placeholder",
        "no description available",
        f"Product image {n % 20 + 1}",
        "banner",
        "logo",
        "Loading...",
    )
    return options[int(rng.integers(len(options)))]


def generic_caption(rng: np.random.Generator) -> str:
    """Captions of off-domain web images."""
    options = (
        "beautiful abstract wallpaper for your desktop",
        "Best deals on running shoes this week",
        "scanned document, page 3",
        "sunset over the hills on our summer vacation",
        "Buy now! Limited time offer",
        "colorful background texture",
        "terms and conditions of service",
        "landscape photography print",
        "our team at the annual meeting",
        "Top 10 travel destinations in 2019",
        "high resolution desktop background",
        "invoice template free",
    )
    return options[int(rng.integers(len(options)))]
