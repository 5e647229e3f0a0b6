"""Procedural frontal chest radiograph phantoms: the images of the synthetic world (see synthetic.py).

`render_image(study, size)` draws thorax and soft tissue, two lung fields with vessel-like texture, heart and
mediastinum, diaphragm domes, ribs, clavicles and spine, with per-image variation of body size, position,
rotation, exposure, gamma, noise and blur; then each finding of the study (side, zone, size, severity) and any
support devices. Anatomy, noise and each finding draw from separate random streams, so a study renders the same
with or without one of its findings.
"""
import functools

import numpy as np
from PIL import Image, ImageDraw

FINDINGS = ["cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "nodule", "mass", "edema",
            "atelectasis"]
CM_PER_BODY_UNIT = 19.0  # the thorax, ~30 cm wide, spans ~1.6 body units


# Rendering. Anatomy lives in a "body frame" (x to the image right, y down, the thorax spanning about x in
# [-0.8, 0.8]); a per-image similarity transform maps it onto the pixels. q = side * x is the distance from the
# midline towards one lung's lateral wall (side -1: image left = the patient's right), so one formula draws both.

def _ramp(d, width):
    """Soft inside-indicator of a signed distance d (> 0 inside): 0..1 over `width` body units."""
    return np.clip(d / width + 0.5, 0.0, 1.0)


def _distance(x, y, cx, cy):
    return np.sqrt((x - cx) ** 2 + (y - cy) ** 2)  # np.hypot is several times slower


@functools.lru_cache(maxsize=4)
def _noise_bank(size):
    """White and smooth (~1/12 image scale) unit-variance noise of side 2 * size from a fixed seed, made once per
    process: per-image noise is a random crop, much cheaper than drawing fresh noise for every image."""
    rng = np.random.default_rng([size, 7])
    white = rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
    coarse = Image.fromarray(rng.standard_normal((24, 24), dtype=np.float32), "F")
    smooth = np.asarray(coarse.resize((2 * size, 2 * size), Image.BICUBIC))
    return white, smooth / smooth.std()


def _noise(rng, size, kind):
    """A (size, size) crop of the white (kind 0) or smooth (kind 1) noise bank at a random offset."""
    top, left = rng.integers(0, size, 2)
    return _noise_bank(size)[kind][top:top + size, left:left + size]


def _bbox(mask):
    """(x, y, w, h) of the true pixels of a (S, S) mask, or None."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


class _Canvas:
    """The pixel grid of one image in body coordinates (x, y), and the body -> pixel transform."""

    def __init__(self, size, rng):
        self.size, self.scale = size, rng.uniform(0.86, 1.0)  # body size and position vary per image
        self.center, self.angle = rng.uniform(-0.04, 0.04, 2) + [0.0, 0.03], np.deg2rad(rng.uniform(-4, 4))
        u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
        du, dv = u[None, :] - self.center[0], u[:, None] - self.center[1]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        self.x = ((du * cos + dv * sin) / self.scale).astype(np.float32)  # (S, S)
        self.y = ((-du * sin + dv * cos) / self.scale).astype(np.float32)  # (S, S)

    def to_pixels(self, x, y):
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = self.center[0] + self.scale * (x * cos - y * sin)
        v = self.center[1] + self.scale * (x * sin + y * cos)
        return (u + 1) * self.size / 2 - 0.5, (v + 1) * self.size / 2 - 0.5

    def layer(self, strokes, reduce=2):
        """Draw polylines [(xs, ys, width, value 0..255)] (body units) with PIL on a grid `reduce` times coarser,
        upsampled bilinearly (a cheap blur); returns a float layer 0..1 of shape (S, S)."""
        size = self.size // reduce
        image = Image.new("L", (size, size))
        draw = ImageDraw.Draw(image)
        px, py = self.to_pixels(np.concatenate([s[0] for s in strokes]), np.concatenate([s[1] for s in strokes]))
        points = list(zip(((px + 0.5) / reduce - 0.5).tolist(), ((py + 0.5) / reduce - 0.5).tolist()))
        start = 0
        for xs, _, width, value in strokes:
            draw.line(points[start:start + len(xs)], fill=int(value), joint="curve" if len(xs) > 2 else None,
                      width=max(1, round(width * self.scale * size / 2)))
            start += len(xs)
        return np.asarray(image.resize((self.size, self.size), Image.BILINEAR), dtype=np.float32) / 255


def _vessel_strokes(rng, side):
    """The vascular markings of one lung: a tree branching out of the hilum."""
    strokes, stack = [], [(side * 0.17, -0.02, a, 0.15, 0.022, 0) for a in np.linspace(-1.5, 1.2, 5)
                          + rng.uniform(-0.2, 0.2, 5)]
    while stack:
        x, y, angle, length, width, depth = stack.pop()
        x2, y2 = x + side * length * np.cos(angle), y + length * np.sin(angle)
        strokes.append(([x, x2], [y, y2], width, 255 - 45 * depth))
        if depth < 3:
            stack += [(x2, y2, angle + turn * rng.uniform(0.15, 0.5), length * rng.uniform(0.7, 0.85), width * 0.68,
                       depth + 1) for turn in (-1, 1)]
    return strokes


def _bone_strokes(rng):
    """Posterior ribs arching out of the spine, fainter anterior ribs running down to the sternum, clavicles."""
    strokes, t = [], np.linspace(0, 1, 16)
    rib_top, rib_gap = rng.uniform(-0.74, -0.68), rng.uniform(0.1, 0.115)
    for side in (-1, 1):
        for k in range(10):
            y0 = rib_top + k * rib_gap + rng.normal(0, 0.008)
            q, y = 0.07 + 0.84 * t, y0 - 0.11 * np.sin(np.pi * t * 0.75) + 0.3 * t ** 3
            strokes += [(side * q, y, 0.048, 200), (side * q, y, 0.026, 110)]  # bright cortex, paler marrow
            if 1 <= k < 7:
                strokes.append((side * (0.9 - 0.6 * t), y0 + 0.05 + 0.28 * t - 0.06 * t ** 2, 0.035, 70))
        strokes.append((side * (0.06 + 0.62 * t), -0.62 - 0.2 * t + 0.03 * np.sin(2 * np.pi * t), 0.055, 255))
    return strokes


def _device_strokes(devices):
    t = np.linspace(0, 1, 12)
    paths = {"endotracheal tube": [([0.0, 0.0], [-1.3, -0.36], 0.024)],
             "enteric tube": [(0.02 + 0.42 * t ** 3, -1.3 + 1.98 * t, 0.018)],
             "central venous catheter": [(-0.34 + 0.29 * t ** 0.5, -1.2 + 1.0 * t, 0.014)],
             "pacemaker": [([0.44, 0.6], [-0.58, -0.58], 0.11), (0.46 - 0.5 * t, -0.54 + 0.82 * t ** 1.3, 0.012)]}
    return [(xs, ys, width, 255) for device in devices for xs, ys, width in paths[device]]


def render_image(study, size: int = 256, regions: list | None = None):
    """Render the study's frontal radiograph: (uint8 array (size, size), boxes), boxes a list of (finding index,
    "right" | "left" | "" (the box's side), (x, y, w, h) in pixels). Anatomy, noise and each finding draw from
    their own random streams, so removing a finding leaves the rest of the image unchanged. `regions`, if given,
    receives (finding index, side, bool mask (size, size)) of each lung finding: the pixels its box encloses."""
    rng = np.random.default_rng([study.seed, 0])
    canvas = _Canvas(size, rng)
    x, y = canvas.x, canvas.y
    apex, lung_width = rng.uniform(-0.76, -0.68), rng.uniform(0.66, 0.74)
    dome_peak = {-1: rng.uniform(0.34, 0.42)}
    dome_peak[1] = dome_peak[-1] + rng.uniform(0.02, 0.07)  # the left hemidiaphragm sits lower
    heart_half_width, enlarged = rng.uniform(0.31, 0.36), rng.uniform(0.45, 0.48)
    for finding in study.findings:  # cardiomegaly: cardiothoracic ratio 0.55-0.7 instead of ~0.42
        if finding.name == "cardiomegaly":
            heart_half_width = enlarged + 0.045 * finding.severity

    # Soft tissue: the neck widening into sloping shoulders, a denser abdomen and chest wall.
    body = _ramp(0.3 + 0.75 * np.sqrt(np.clip((y + 1.05) / 0.35, 0, 1)) - np.abs(x), 0.08)
    density = body * (0.42 + 0.12 * _ramp(y - 0.45, 0.8) + 0.08 * _ramp(np.abs(x) - 0.86, 0.14))
    # Heart borders bulge out of the mediastinum, most towards the cardiac apex (image right); with the
    # mediastinum and the aortic knob they hide the lung air behind them.
    rise = np.sin(np.pi / 2 * np.clip((y + 0.12) / 0.5, 0, 1)) ** 0.45
    heart = _ramp(np.minimum(np.minimum(0.12 + (1.24 * heart_half_width - 0.12) * rise - x,
                                        x + 0.1 + (0.76 * heart_half_width - 0.1) * rise), y + 0.12), 0.025)
    mediastinum = _ramp(0.1 + 0.04 * _ramp(y + 0.2, 0.6) - np.abs(x - 0.01), 0.03)
    hidden = np.maximum(np.maximum(heart, mediastinum), _ramp(0.06 - _distance(x, y, 0.12, -0.28), 0.05))
    lungs = {}
    for side in (-1, 1):
        q = side * x
        lateral = 0.1 + lung_width * np.sqrt(1 - (1 - np.clip((y - apex) / (0.6 - apex), 0, 1)) ** 2.4)
        dome = dome_peak[side] + 0.3 * ((q - 0.3) / 0.5) ** 2
        distance = np.minimum(np.minimum(q - 0.03, lateral - q), np.minimum(dome - y, y - apex))
        # a lung is thickest in its middle, so its air shadow fades towards the edges
        lungs[side] = (_ramp(distance, 0.015) * (0.6 + 0.4 * np.clip(distance / 0.12, 0, 1)), q, lateral)
    bones = canvas.layer(_bone_strokes(rng))
    vessels = canvas.layer(_vessel_strokes(rng, -1) + _vessel_strokes(rng, 1))
    mottle = _noise(rng, size, 1)

    air_weight, vessel_weight, lines, boxes = np.ones_like(x), np.ones_like(x), np.zeros_like(x), []
    for index, finding in enumerate(study.findings):
        if finding.name == "cardiomegaly":  # the box: the heart silhouette above the diaphragm
            boxes += [(index, "", box)] if (box := _bbox((heart > 0.5) & (y < dome_peak[1] + 0.1))) else []
            continue
        finding_rng = np.random.default_rng([study.seed, 2, FINDINGS.index(finding.name)])
        for side in {"right": [-1], "left": [1]}.get(finding.side, [-1, 1]):
            lung, q, lateral = lungs[side]
            opacity, lucency = _finding_effect(finding, finding_rng, x, y, q, lateral, apex, side)
            air_weight *= 1 - opacity
            if finding.name == "edema":  # vessels become indistinct in the haze
                vessel_weight *= 1 - 0.8 * opacity
            if lucency is not None:  # pneumothorax: a lucent rim without vessels, a thin pleural line
                opacity, line = lucency
                air_weight *= 1 + 0.35 * opacity
                vessel_weight *= 1 - opacity
                lines += line * (lung > 0.3)
            region = (opacity > 0.2) & (lung > 0.3) & (hidden < 0.5)
            if regions is not None:
                regions.append((index, "right" if side < 0 else "left", region))
            if box := _bbox(region):
                boxes.append((index, "right" if side < 0 else "left", box))
    air = (lungs[-1][0] + lungs[1][0]) * (1 - 0.95 * hidden) * air_weight * (1 + 0.07 * mottle)
    air *= 1 - 0.15 * _ramp(y - 0.2, 0.5)  # overlying soft tissue whitens the bases a little
    hilum_distance = np.minimum(_distance(x, y, -0.18, -0.03), _distance(x, y, 0.18, -0.03))
    vessels *= vessel_weight * np.minimum(air, 1) * np.exp(-hilum_distance / 0.45)
    density += 0.12 * vessels + 0.06 * np.exp(-(hilum_distance / 0.06) ** 2) + 0.09 * bones + 0.07 * lines - 0.42 * air
    density += 0.05 * body * _ramp(0.07 - np.abs(x), 0.02) * (1 - 0.6 * _ramp(y - 0.55, 0.3))  # spine
    density -= 0.08 * body * _ramp(0.03 - np.abs(x - 0.005), 0.015) * _ramp(-0.2 - y, 0.03)  # trachea
    gastric_bubble = ((x - 0.38) / 0.1) ** 2 + ((y - dome_peak[1] - 0.12) / 0.06) ** 2 < 1
    density -= 0.05 * gastric_bubble * (1 - _ramp(dome_peak[1] + 0.04 - y, 0.02))
    if study.devices:
        density += 0.35 * canvas.layer(_device_strokes(study.devices), reduce=1)

    # Exposure, gamma, quantum noise and mottle, then detector blur: separable [a, 1 - 2a, a] kernels.
    noise_rng = np.random.default_rng([study.seed, 1])
    exposure, gamma, noise = noise_rng.uniform(1.3, 1.5), noise_rng.uniform(0.8, 1.2), noise_rng.uniform(0.03, 0.05)
    intensity = np.clip(0.03 + exposure * density, 0, 1) ** gamma
    intensity += noise * _noise(noise_rng, size, 0) + 0.02 * _noise(noise_rng, size, 1)
    a, b = noise_rng.uniform(0.1, 0.3, 2)
    padded = np.pad(intensity, ((1, 1), (0, 0)), mode="edge")
    intensity = (1 - 2 * a) * intensity + a * (padded[:-2] + padded[2:])
    padded = np.pad(intensity, ((0, 0), (1, 1)), mode="edge")
    intensity = (1 - 2 * b) * intensity + b * (padded[:, :-2] + padded[:, 2:])
    return np.clip(intensity * 255 + 0.5, 0, 255).astype(np.uint8), boxes


def _finding_effect(finding, rng, x, y, q, lateral, apex, side):
    """(opacity 0..1 that replaces lung air, None or pneumothorax (lucent rim, pleural line)) on one side."""
    name, severity, size = finding.name, finding.severity, x.shape[0]
    if name == "pleural effusion":  # a fluid level rising towards the lateral wall: the meniscus
        level = [0.47, 0.2, -0.1][severity] + rng.uniform(-0.03, 0.03) + 0.25 * np.clip((0.85 - q) / 0.75, 0, 1) ** 2
        return 0.92 * _ramp(y - level, 0.05) * (q > -0.05), None
    if name == "pneumothorax":  # the lung edge falls away from the chest wall, most at the apex
        gap = [0.0, 0.1, 0.2][severity] + 0.1 * _ramp(-0.25 - y, 0.4) * (severity == 0)
        edge = np.minimum(lateral - gap - q, y - apex - [0.08, 0.12, 0.2][severity])
        rim = _ramp(-edge - 0.015, 0.01)
        collapsed = [0.05, 0.15, 0.3][severity] * (1 - rim) * (q > 0)  # the shrunken lung holds less air
        return collapsed, (rim, np.exp(-(edge / 0.007) ** 2) * (edge > -0.03))
    if name == "edema":  # bilateral perihilar ("bat wing") haze
        haze = np.exp(-((q - 0.22) ** 2 / (2 * 0.2 ** 2) + y ** 2 / (2 * 0.28 ** 2)))
        return [0.35, 0.5, 0.65][severity] * haze, None
    if name == "atelectasis":  # a plate-like band above the diaphragm; on the left, clear of the heart
        cq, tilt = rng.uniform(0.4, 0.55) + 0.1 * (side > 0), rng.uniform(-0.25, 0.25)
        cy = 0.36 + 0.3 * ((cq - 0.3) / 0.5) ** 2 - rng.uniform(0.1, 0.15)
        along = (q - cq) * np.cos(tilt) + (y - cy) * np.sin(tilt)
        across = -(q - cq) * np.sin(tilt) + (y - cy) * np.cos(tilt)
        length, thickness = 0.26 + 0.06 * severity, 0.025 + 0.01 * severity
        return 0.55 * _ramp(thickness - np.abs(across), 0.025) * _ramp(length / 2 - np.abs(along), 0.06), None
    zone_y = {"upper": (-0.52, -0.32), "lower": (0.14, 0.24)}.get(finding.zone, (-0.14, 0.04))  # or middle
    cq, cy = rng.uniform(0.42, 0.6), rng.uniform(*zone_y)
    if name in ("nodule", "mass"):
        blob = _ramp(finding.size_cm / 2 / CM_PER_BODY_UNIT - _distance(q, y, cq, cy), 0.012)
        return (0.3 if name == "nodule" else 0.85) * blob, None
    patch = np.zeros_like(x)  # consolidation: a cluster of blobs broken up by noise, a patchy airspace opacity
    for _ in range(rng.integers(4, 8)):
        bq, by, r = cq + rng.normal(0, 0.05), cy + rng.normal(0, 0.05), rng.uniform(0.05, 0.09)
        patch = np.maximum(patch, np.exp(-((q - bq) ** 2 + (y - by) ** 2) / (2 * r * r)))
    patch = np.clip((patch * (0.75 + 0.25 * _noise(rng, size, 1)) - 0.2) * 2, 0, 1)
    return [0.45, 0.65, 0.85][severity] * patch, None
