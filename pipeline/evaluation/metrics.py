"""The sample-quality metrics, computed on feature vectors and class probabilities: pure math,
no files, no models. Distances and kernel sums accumulate in float64."""

from __future__ import annotations

import logging

import torch

from pipeline.io import seeded_generator

log = logging.getLogger(__name__)


def mean_and_covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row mean and unbiased covariance of ``x``, in float64."""
    x = x.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root by eigendecomposition; round-off negatives clamped to 0."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(
    mu1: torch.Tensor,
    sigma1: torch.Tensor,
    mu2: torch.Tensor,
    sigma2: torch.Tensor,
    sqrt_sigma1: torch.Tensor | None = None,
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017), in float64.

    tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric PSD, so eigh
    applies; this avoids the complex round-off of a general matrix sqrt on singular covariances.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1.double()
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)


def _poly_kernel_sum(a: torch.Tensor, b: torch.Tensor, skip_diagonal: bool) -> torch.Tensor:
    """Sum of k(a_i, b_j) = (a_i.b_j / d + 1)^3, accumulated in float64 because MMD^2 is a small
    difference of large kernel sums."""
    kernel = (a @ b.T).div_(a.shape[1]).add_(1).pow_(3)
    total = kernel.sum(dtype=torch.float64)
    return total - kernel.diagonal().sum(dtype=torch.float64) if skip_diagonal else total


def kernel_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    num_subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), as mean and
    std over random subsets of equal size m, which keeps it unbiased at any sample count."""
    real, fake = real.float().cpu(), fake.float().cpu()
    m = min(subset_size, real.shape[0], fake.shape[0])
    generator = seeded_generator(seed, "kid-subsets")
    # A subset that is the whole fake set is the same set every time: one k(y, y') sum suffices.
    fake_whole = fake.shape[0] == m
    yy_whole = _poly_kernel_sum(fake, fake, skip_diagonal=True) if fake_whole else None
    estimates = []
    for _ in range(num_subsets):
        x = real[torch.randperm(real.shape[0], generator=generator)[:m]]
        y = fake if fake_whole else fake[torch.randperm(fake.shape[0], generator=generator)[:m]]
        yy = yy_whole if yy_whole is not None else _poly_kernel_sum(y, y, skip_diagonal=True)
        xx = _poly_kernel_sum(x, x, skip_diagonal=True)
        xy = _poly_kernel_sum(x, y, skip_diagonal=False)
        estimates.append((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m))
    values = torch.stack(estimates)
    return float(values.mean()), float(values.std()) if num_subsets > 1 else 0.0


def _row_chunk(num_columns: int, budget_bytes: int = 64 * 2**20) -> int:
    """Rows per distance block so that one float64 block stays under ``budget_bytes``."""
    return max(1, budget_bytes // (8 * max(num_columns, 1)))


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point, in row blocks."""
    points = points.double()
    radii = []
    chunk = _row_chunk(points.shape[0])
    for start in range(0, points.shape[0], chunk):
        dist = torch.cdist(points[start : start + chunk], points)
        # k + 1 nearest because the nearest is the point itself, at distance 0.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor
) -> torch.Tensor:
    """Whether each query lies in some support point's k-NN ball, in row blocks."""
    queries, support = queries.double(), support.double()
    inside = []
    chunk = _row_chunk(support.shape[0])
    for start in range(0, queries.shape[0], chunk):
        dist = torch.cdist(queries[start : start + chunk], support)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of fakes
    inside the real k-NN manifold, recall the fraction of reals inside the fake one."""
    real, fake = real.double().cpu(), fake.double().cpu()
    precision = _inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = _inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def equal_size_subsets(
    real: torch.Tensor, fake: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample the larger set to the size of the smaller: k-NN radii shrink with set size, and
    Kynkaanniemi et al. compare equal-sized sets, so unequal sizes would bias precision against
    recall."""
    m = min(real.shape[0], fake.shape[0])
    generator = seeded_generator(seed, "precision-recall-subsets")

    def subsample(x: torch.Tensor) -> torch.Tensor:
        return x[torch.randperm(x.shape[0], generator=generator)[:m]] if x.shape[0] > m else x

    return subsample(real), subsample(fake)


def class_histogram(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of samples whose predicted (argmax) class is each class."""
    counts = torch.bincount(probs.argmax(dim=1).cpu(), minlength=num_classes).double()
    return counts / counts.sum()


def class_kl(sample_hist: torch.Tensor, real_hist: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(samples || real) of the class histograms; eps keeps empty classes finite. A generator
    that collapses to one of 10 balanced classes scores log(10) ~ 2.3."""
    p = (sample_hist.double() + eps) / (1 + eps * sample_hist.numel())
    q = (real_hist.double() + eps) / (1 + eps * real_hist.numel())
    return float((p * (p / q).log()).sum())


def classes_covered(sample_hist: torch.Tensor, real_hist: torch.Tensor) -> int:
    """Classes predicted for at least half their real share of the samples (mode coverage)."""
    return int((sample_hist >= 0.5 * real_hist).sum())
