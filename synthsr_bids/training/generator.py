"""The SynthSR generative model: label maps -> (input, target, labels, lesion mask) batches.

Per sample (all in PyTorch, on CPU or CUDA, seeded):

1. **Spatial** (:mod:`.spatial`): random affine about the brain (scaling, rotation, shear,
   translation) composed with a diffeomorphic deformation (stationary velocity field integrated
   by scaling and squaring). Only the output crop is ever built: one nearest-neighbour gather
   reads the deformed, cropped label map straight from the stored ``uint8`` index map. Random
   left-right flip (with left/right label swap); optional skull stripping.
2. **Target**: a 1 mm synthetic T1 MPRAGE from the same labels (T1 prior class means, white
   matter at ``target_wm_value``), no bias, no lesions, Gaussian blur ``target_blur`` voxels.
3. **Input** (:mod:`.intensity`): Gaussian mixture with random or realistic (T1/T2/FLAIR/PD/CT)
   class parameters; synthetic lesions (:mod:`.lesions`) painted in; acquisition
   (:mod:`.resolution`): slice profile + slice spacing along one or more axes (axis-aligned or
   oblique) or near-isotropic 1 mm, Rician noise at acquisition resolution, linear upsampling
   back to 1 mm; bias field; min-max to [0, 1]; random gamma.

The conventions match inference (``mri_synthsr``): the input is a RAS-ordered 1 mm volume
min-max normalised to [0, 1]; the network output times 255 is a FreeSurfer-like T1 (white matter
about 110), so targets are in units of 1/255.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import lesions as lz
from .intensity import minmax, render_gmm, rician_noise, smooth_random_field
from .labels import ContrastPriors, LabelScheme, LabelVolume
from .resolution import (
    AxisAcquisition,
    apply_along_axis,
    blur,
    linear_upsampling_matrix,
    rotate_volume,
    slice_sampling_matrix,
)
from .rng import RandomSource
from .spatial import affine_matrix, gather_nearest, identity_coordinates, integrate_velocity, rotation_matrix

__all__ = [
    "CONTRASTS",
    "GeneratorConfig",
    "AcquisitionParams",
    "SampleParams",
    "SynthBatch",
    "SynthGenerator",
]

LOGGER = logging.getLogger(__name__)

#: Contrast families the intensity model can draw ("random" = SynthSeg-style random GMM).
CONTRASTS = ("random", "t1", "t2", "flair", "pd", "ct")

_WHITE_MATTER = (2, 41)
_CORTEX = (3, 42)
_CSF_SPACES = (4, 5, 14, 15, 24, 43, 44, 72, 136, 137, 163, 164)


@dataclass(frozen=True)
class GeneratorConfig:
    """Sampling ranges of the generative model (defaults: SynthSR/SynthSeg's, tuned for speed).

    Ranges are ``(low, high)`` of uniform distributions unless stated otherwise.
    """

    crop_shape: tuple[int, int, int] = (96, 96, 96)
    # spatial
    scaling: tuple[float, float] = (0.85, 1.15)
    rotation_deg: float = 15.0  #: U(-r, r) per axis
    shear: float = 0.02  #: U(-s, s) per shear term
    translation_mm: float = 4.0  #: N(0, t) jitter of the crop centre, on top of the random crop
    #: Share of crops centred in the brain tissue box (:attr:`LabelVolume.tissue_box`) instead of the
    #: whole-head box: in many label maps the extra-cerebral CSF runs down the spinal canal, so head-box
    #: crops land on the neck in about a third of the samples. 0 keeps the random stream unchanged.
    tissue_crop_prob: float = 0.0
    svf_std_max: float = 4.0  #: velocity ~ N(0, s), s ~ U(0, svf_std_max), in mm
    svf_spacing_mm: float = 32.0  #: node spacing of the velocity field (~1/32 of a 256 mm field)
    svf_steps: int = 7
    svf_integration_factor: int = 4  #: integrate on a grid this many times coarser than the crop
    flip_prob: float = 0.5
    skull_strip_prob: float = 0.15
    # intensities
    contrast_probs: tuple[tuple[str, float], ...] = (
        ("random", 0.5), ("t1", 0.15), ("t2", 0.1), ("flair", 0.1), ("pd", 0.05), ("ct", 0.1),
    )
    random_mean: tuple[float, float] = (0.0, 225.0)
    random_std: tuple[float, float] = (0.0, 25.0)
    bias_std_max: float = 0.3  #: log-bias ~ N(0, s), s ~ U(0, bias_std_max)
    bias_spacing_mm: float = 32.0
    gamma_std: float = 0.5  #: gamma = exp(N(0, gamma_std))
    noise_max: float = 0.05  #: Rician sigma ~ U(0, noise_max) x brightest class mean
    # acquisition
    isotropic_prob: float = 0.2  #: near-1 mm acquisition
    isotropic_spacing: tuple[float, float] = (1.0, 1.3)
    thick_axes_probs: tuple[float, float, float] = (0.75, 0.15, 0.1)  #: P(1, 2, 3 thick axes)
    slice_spacing: tuple[float, float] = (1.0, 9.0)  #: thickness ~ U(1, spacing)
    lowres_3d_spacing: tuple[float, float] = (1.5, 4.0)  #: spacing when all 3 axes are thick
    oblique_prob: float = 0.25
    oblique_max_deg: float = 30.0
    # pathology (input only)
    plaque_prob: float = 0.15
    stroke_prob: float = 0.1
    tumour_prob: float = 0.1
    mass_effect: tuple[float, float] = (0.2, 0.6)  #: strength of the tumour's radial expansion
    # target
    target_wm_value: float = 110.0 / 255.0
    target_blur: float = 0.5

    def __post_init__(self) -> None:
        if len(self.crop_shape) != 3 or any(int(s) < 4 for s in self.crop_shape):
            raise ValueError(f"crop_shape must be 3 sizes >= 4, got {self.crop_shape}")
        names = [name for name, _ in self.contrast_probs]
        unknown = sorted(set(names) - set(CONTRASTS))
        if unknown:
            raise ValueError(f"unknown contrasts {unknown} in contrast_probs; known: {CONTRASTS}")
        if sum(p for _, p in self.contrast_probs) <= 0:
            raise ValueError("contrast_probs must have a positive total")
        for name in ("flip_prob", "skull_strip_prob", "isotropic_prob", "oblique_prob", "plaque_prob",
                     "stroke_prob", "tumour_prob", "tissue_crop_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GeneratorConfig.{name} must be in [0, 1], got {value}")
        if len(self.thick_axes_probs) != 3 or sum(self.thick_axes_probs) <= 0:
            raise ValueError("thick_axes_probs must be 3 non-negative weights with a positive sum")


@dataclass(frozen=True)
class AcquisitionParams:
    """How the input was 'acquired': one :class:`AxisAcquisition` per axis of the acquisition frame."""

    axes: tuple[AxisAcquisition, AxisAcquisition, AxisAcquisition]
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  #: oblique slices (0 = axis-aligned)
    noise_sigma: float = 0.0

    @property
    def thick_axes(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if not a.is_high_res)

    @property
    def oblique(self) -> bool:
        return any(abs(a) > 1e-9 for a in self.rotation_deg)


@dataclass(frozen=True)
class SampleParams:
    """Everything that was drawn for one sample (for logs and tests)."""

    volume: str
    contrast: str
    flipped: bool
    skull_stripped: bool
    acquisition: AcquisitionParams
    lesions: tuple[str, ...]
    svf_std: float
    bias_std: float
    gamma: float


@dataclass(frozen=True, eq=False)
class SynthBatch:
    """One batch. Tensors are ``(N, 1, D, H, W)``.

    Attributes:
        input: float32 network input in [0, 1].
        target: float32 synthetic 1 mm T1 (units of 1/255: white matter ~ 110/255).
        labels: int64 segmentation channel index (``LabelScheme.segmentation_labels[k]``).
        lesion_mask: bool, voxels where pathology was painted into the input.
        params: one :class:`SampleParams` per sample.
    """

    input: Tensor
    target: Tensor
    labels: Tensor
    lesion_mask: Tensor
    params: tuple[SampleParams, ...] = field(default_factory=tuple)

    def to(self, device: torch.device | str) -> SynthBatch:
        return SynthBatch(self.input.to(device), self.target.to(device), self.labels.to(device),
                          self.lesion_mask.to(device), self.params)


class SynthGenerator:
    """Draws :class:`SynthBatch` es from label maps.

    Args:
        volumes: label maps (see :func:`.labels.load_label_map`).
        scheme: label lists, classes and T1 priors.
        contrasts: priors of the realistic non-T1 contrasts.
        config: sampling ranges.
        seed: seed of the :class:`RandomSource` (same seed, same batches).
        device: where the tensors are built.
    """

    def __init__(
        self,
        volumes: Sequence[LabelVolume],
        scheme: LabelScheme,
        contrasts: ContrastPriors,
        config: GeneratorConfig = GeneratorConfig(),
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not volumes:
            raise ValueError("SynthGenerator needs at least one label map")
        self.config = config
        self.scheme = scheme
        self.contrasts = contrasts
        self.device = torch.device(device)
        self.rng = RandomSource(seed, self.device)
        self.volumes = list(volumes)
        self._maps = [torch.from_numpy(np.ascontiguousarray(v.indices)).to(self.device) for v in volumes]
        missing = [name for name, p in config.contrast_probs if p > 0 and name not in ("random", "t1")
                   and name not in contrasts.names]
        if missing:
            raise ValueError(f"contrast_probs uses {missing} but the contrast priors only define {contrasts.names}")
        dev = self.device
        self._swap = torch.from_numpy(scheme.swap_lut()).to(dev)
        self._seg = torch.from_numpy(scheme.segmentation_lut()).to(dev)
        self._extra = torch.from_numpy(scheme.extracerebral_lut()).to(dev)
        self._random_classes = torch.from_numpy(scheme.random_classes)
        self._contrast_classes = torch.from_numpy(scheme.contrast_classes)
        csf_like = scheme.mask_lut(_CSF_SPACES)
        self._tables = lz.LesionTables(
            white_matter=torch.from_numpy(scheme.mask_lut(_WHITE_MATTER)),
            cerebral_tissue=torch.from_numpy(scheme.mask_lut(_WHITE_MATTER + _CORTEX)),
            brain=torch.from_numpy((scheme.labels > 0) & ~scheme.extracerebral_lut() & ~csf_like),
        ).to(dev)
        self._csf_class = int(scheme.contrast_classes[scheme.index_of(24)]) if 24 in scheme.labels else int(
            scheme.contrast_classes[scheme.index_of(4)])
        self._target_lut = self._target_table().to(dev)
        names, probs = zip(*config.contrast_probs, strict=True)
        self._contrast_names = tuple(names)
        self._contrast_cdf = np.cumsum(np.asarray(probs, dtype=np.float64) / float(sum(probs)))

    # ------------------------------------------------------------------ public API
    def get_state(self) -> dict:
        return self.rng.get_state()

    def set_state(self, state: dict) -> None:
        self.rng.set_state(state)

    def generate(self, batch_size: int = 1, *, volume_index: int | None = None) -> SynthBatch:
        """Draw ``batch_size`` samples (each from a random label map unless ``volume_index``)."""
        samples = [self.sample(volume_index=volume_index) for _ in range(batch_size)]
        inputs, targets, labels, masks, params = zip(*samples, strict=True)
        return SynthBatch(
            input=torch.stack(inputs)[:, None],
            target=torch.stack(targets)[:, None],
            labels=torch.stack(labels)[:, None],
            lesion_mask=torch.stack(masks)[:, None],
            params=tuple(params),
        )

    def sample(self, *, volume_index: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, SampleParams]:
        """One ``(input, target, segmentation labels, lesion mask, params)`` sample (3D tensors)."""
        cfg, rng = self.config, self.rng
        vi = rng.randint(len(self.volumes)) if volume_index is None else int(volume_index)
        volume = self.volumes[vi]

        # ---- spatial: one map from output voxels to source voxels
        shape = tuple(int(s) for s in cfg.crop_shape)
        matrix = affine_matrix(
            rng.uniform_tensor(cfg.scaling[0], cfg.scaling[1], (3,)),
            rng.uniform_tensor(-cfg.rotation_deg, cfg.rotation_deg, (3,)),
            rng.uniform_tensor(-cfg.shear, cfg.shear, (3,)),
        )
        # no draw at probability 0: runs started before this option keep their random stream
        tissue = cfg.tissue_crop_prob > 0 and rng.bernoulli(cfg.tissue_crop_prob)
        box_centre, box_extent = volume.box_centre_extent("tissue" if tissue else "brain")
        slack = np.maximum(box_extent - np.asarray(shape), 0.0) / 2.0
        centre = (box_centre + rng.uniform_tensor(-torch.from_numpy(slack), torch.from_numpy(slack), (3,)).numpy()
                  + rng.normal_tensor(0.0, cfg.translation_mm, (3,)).numpy())
        svf_std = rng.uniform(0.0, cfg.svf_std_max)
        coords = identity_coordinates(shape, device=self.device)  # type: ignore[arg-type]
        points = coords + self._displacement(shape, svf_std)
        mat = matrix.to(device=self.device, dtype=torch.float32)
        centre_t = torch.tensor(centre, device=self.device, dtype=torch.float32)
        src = points @ mat.T + centre_t
        label_idx = gather_nearest(self._maps[vi], src)

        flipped = rng.bernoulli(cfg.flip_prob)
        tumour = lz.sample_tumour(label_idx, self._tables, rng=rng) if rng.bernoulli(cfg.tumour_prob) else None
        if tumour is not None:
            # Mass effect: expand the anatomy around the tumour (labels, input and target alike).
            c = torch.tensor(tumour.centre, device=self.device, dtype=torch.float32) - torch.tensor(
                [(s - 1) / 2.0 for s in shape], device=self.device)
            offsets = lz.mass_effect_offsets(coords, c, radius=tumour.core_radius * rng.uniform(1.0, 1.5),
                                             strength=rng.uniform(*cfg.mass_effect))
            label_idx = gather_nearest(self._maps[vi], src + offsets @ mat.T)
        if flipped:
            label_idx = self._swap[label_idx.flip(0).long()].to(torch.uint8)
            if tumour is not None:
                tumour = lz.TumourShape((shape[0] - 1 - tumour.centre[0], *tumour.centre[1:]),
                                        tumour.core_radius, tumour.oedema_factor, tumour.necrosis_factor)
        stripped = rng.bernoulli(cfg.skull_strip_prob)
        if stripped:
            label_idx = torch.where(self._extra[label_idx.long()], torch.zeros_like(label_idx), label_idx)

        # ---- target: healthy synthetic T1
        target = blur(self._target_lut[label_idx.long()], (cfg.target_blur,) * 3)

        # ---- input: contrast, lesions, acquisition, bias, normalisation, gamma
        contrast = self._contrast_names[int(np.searchsorted(self._contrast_cdf, rng.uniform(0.0, 1.0), side="right").clip(
            0, len(self._contrast_names) - 1))]
        label_means, label_stds, csf_mean, csf_std = self._intensity_tables(contrast)
        image = render_gmm(label_idx, label_means, label_stds, rng=rng)
        scale = float(label_means.max().clamp_min(1.0))
        lesion_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        kinds: list[str] = []
        if rng.bernoulli(cfg.plaque_prob):
            mask = lz.plaque_mask(label_idx, self._tables, rng=rng)
            image = lz.paint_plaques(image, mask, scale=scale, rng=rng)
            lesion_mask |= mask
            if bool(mask.any()):  # no white matter in the crop: nothing was painted
                kinds.append("plaques")
        if rng.bernoulli(cfg.stroke_prob):
            image, mask = lz.paint_stroke(image, label_idx, self._tables, csf_mean=csf_mean, csf_std=csf_std, rng=rng)
            lesion_mask |= mask
            if bool(mask.any()):
                kinds.append("stroke")
        if tumour is not None:
            image, mask = lz.paint_tumour(image, label_idx, self._tables, tumour, scale=scale, csf_mean=csf_mean,
                                          csf_std=csf_std, rng=rng)
            lesion_mask |= mask
            kinds.append("tumour")

        acquisition = self.sample_acquisition(scale=scale)
        image = self.acquire(image.clamp_min(0.0), acquisition)
        bias_std = rng.uniform(0.0, cfg.bias_std_max)
        if bias_std > 0:
            image = image * torch.exp(smooth_random_field(shape, spacing_mm=cfg.bias_spacing_mm, std=bias_std, rng=rng))  # type: ignore[arg-type]
        gamma = math.exp(rng.normal(0.0, cfg.gamma_std))
        image = minmax(image.clamp_min(0.0)).pow(gamma)

        params = SampleParams(volume=volume.name, contrast=contrast, flipped=flipped, skull_stripped=stripped,
                              acquisition=acquisition, lesions=tuple(kinds), svf_std=svf_std, bias_std=bias_std,
                              gamma=gamma)
        return image.float(), target.float(), self._seg[label_idx.long()], lesion_mask, params

    # ------------------------------------------------------------------ pieces
    def _displacement(self, shape: tuple[int, int, int], svf_std: float) -> Tensor:
        """``(D, H, W, 3)`` displacement (mm) of the diffeomorphic deformation on the crop."""
        cfg, rng = self.config, self.rng
        if svf_std <= 0:
            return torch.zeros((*shape, 3), device=self.device)
        nodes = tuple(max(2, int(round((s - 1) / cfg.svf_spacing_mm)) + 1) for s in shape)
        velocity = rng.randn((1, 3, *nodes)) * svf_std
        fine = tuple(max(2, -(-s // max(1, cfg.svf_integration_factor))) for s in shape)
        velocity = F.interpolate(velocity, size=fine, mode="trilinear", align_corners=True)
        spacing = tuple((s - 1) / (f - 1) for s, f in zip(shape, fine, strict=True))
        disp = integrate_velocity(velocity, steps=cfg.svf_steps, spacing=spacing)  # type: ignore[arg-type]
        disp = F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
        return disp[0].permute(1, 2, 3, 0)

    def _target_table(self) -> Tensor:
        """Generation label index -> target T1 intensity (T1 prior means, white matter scaled)."""
        means = self.scheme.t1_mean_prior[0][self.scheme.contrast_classes].astype(np.float64)
        wm = means[self.scheme.index_of(2)] if 2 in self.scheme.labels else means.max()
        table = means * (self.config.target_wm_value / wm)
        table[self.scheme.labels == 0] = 0.0
        return torch.from_numpy(table.astype(np.float32))

    def _intensity_tables(self, contrast: str) -> tuple[Tensor, Tensor, float, float]:
        """Per generation label (mean, std) of the Gaussian mixture and the CSF class (mean, std)."""
        cfg, rng, scheme = self.config, self.rng, self.scheme
        n_cc = scheme.n_contrast_classes
        if contrast == "random":
            n = scheme.n_random_classes
            means = rng.uniform_tensor(cfg.random_mean[0], cfg.random_mean[1], (n,))
            stds = rng.uniform_tensor(cfg.random_std[0], cfg.random_std[1], (n,))
            label_means, label_stds = means[self._random_classes], stds[self._random_classes]
            csf = scheme.index_of(24) if 24 in scheme.labels else scheme.index_of(4)
            csf_mean, csf_std = float(label_means[csf]), float(label_stds[csf])
        else:
            if contrast == "t1":
                m, s = scheme.t1_mean_prior, scheme.t1_std_prior
                means = rng.normal_tensor(torch.from_numpy(m[0]), torch.from_numpy(m[1]), (n_cc,)).clamp_min(0.0)
                stds = rng.normal_tensor(torch.from_numpy(s[0]), torch.from_numpy(s[1]), (n_cc,)).clamp_min(0.0)
            else:
                p = self.contrasts
                means = rng.uniform_tensor(torch.from_numpy(p.mean_low[contrast]), torch.from_numpy(p.mean_high[contrast]), (n_cc,))
                stds = rng.uniform_tensor(torch.from_numpy(p.std_low[contrast]), torch.from_numpy(p.std_high[contrast]), (n_cc,))
            label_means, label_stds = means[self._contrast_classes], stds[self._contrast_classes]
            csf_mean, csf_std = float(means[self._csf_class]), float(stds[self._csf_class])
        return label_means.float().to(self.device), label_stds.float().to(self.device), csf_mean, csf_std

    def sample_acquisition(self, *, scale: float = 1.0) -> AcquisitionParams:
        """Draw the acquisition geometry (see :class:`GeneratorConfig`)."""
        cfg, rng = self.config, self.rng
        if rng.bernoulli(cfg.isotropic_prob):
            axes = []
            for _ in range(3):
                spacing = rng.uniform(*cfg.isotropic_spacing)
                axes.append(AxisAcquisition(spacing=1.0, thickness=spacing))
            return AcquisitionParams(axes=tuple(axes), noise_sigma=rng.uniform(0.0, cfg.noise_max) * scale)  # type: ignore[arg-type]
        weights = np.cumsum(np.asarray(cfg.thick_axes_probs, dtype=np.float64) / sum(cfg.thick_axes_probs))
        n_thick = int(np.searchsorted(weights, rng.uniform(0.0, 1.0), side="right")) + 1
        n_thick = min(n_thick, 3)
        order = torch.randperm(3, generator=rng.params).tolist()
        thick = set(order[:n_thick])
        axes = []
        for axis in range(3):
            if axis in thick:
                lo, hi = cfg.lowres_3d_spacing if n_thick == 3 else cfg.slice_spacing
                spacing = rng.uniform(lo, hi)
                thickness = rng.uniform(1.0, spacing) if spacing > 1.0 else spacing
                phase = rng.uniform(0.0, spacing)
                axes.append(AxisAcquisition(spacing=spacing, thickness=thickness, phase=phase))
            else:
                axes.append(AxisAcquisition(spacing=1.0, thickness=rng.uniform(*cfg.isotropic_spacing)))
        rotation = (0.0, 0.0, 0.0)
        if rng.bernoulli(cfg.oblique_prob):
            rotation = tuple(rng.uniform(-cfg.oblique_max_deg, cfg.oblique_max_deg) for _ in range(3))
        return AcquisitionParams(axes=tuple(axes), rotation_deg=rotation,  # type: ignore[arg-type]
                                 noise_sigma=rng.uniform(0.0, cfg.noise_max) * scale)

    def acquire(self, image: Tensor, acq: AcquisitionParams) -> Tensor:
        """Simulate the acquisition of a 1 mm ``image`` and its linear resampling back to 1 mm."""
        shape = tuple(image.shape)
        rotation = None
        sizes = shape
        if acq.oblique:
            rotation = rotation_matrix(torch.tensor(acq.rotation_deg, dtype=torch.float64) * (math.pi / 180.0))
            # Acquisition frame big enough to hold the whole rotated crop.
            half = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=torch.float64)
            extent = rotation.T.abs() @ half
            sizes = tuple(int(2 * math.ceil(float(e)) + 1) for e in extent)
            image = rotate_volume(image, rotation, sizes)  # type: ignore[arg-type]
        for axis, axis_acq in enumerate(acq.axes):
            image = apply_along_axis(image, slice_sampling_matrix(image.shape[axis], axis_acq), axis)
        image = rician_noise(image, acq.noise_sigma, rng=self.rng)
        for axis, axis_acq in enumerate(acq.axes):
            if not axis_acq.is_high_res:
                n = sizes[axis]
                image = apply_along_axis(image, linear_upsampling_matrix(n, axis_acq.positions(n)), axis)
        if rotation is not None:
            image = rotate_volume(image, rotation, shape, inverse=True)  # type: ignore[arg-type]
        return image
