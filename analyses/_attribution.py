"""Attribution share on background pixels (captum, imported lazily)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from probekit.errors import DataError

from ._common import ResultMixin, check_number, check_option

__all__ = ["AttributionShareResult", "background_attribution_share"]


@dataclasses.dataclass(repr=False)
class AttributionShareResult(ResultMixin):
    """Share of |attribution| on background pixels, per sample and mean."""

    mean: float
    per_sample: np.ndarray
    method: str
    n_steps: int
    n_samples: int
    maps: np.ndarray | None = None  # |attribution| summed over channels, (n, H, W), when asked for


def background_attribution_share(
    model: Any, x: Any, masks: Any, target: Any = None, *, layer: Any = None, neuron: Any = None,
    method: str = "integrated_gradients", baseline: Any = 0.0, n_steps: int = 50, batch_size: int = 16,
    return_maps: bool = False,
) -> AttributionShareResult:
    r"""Share of absolute input attribution that falls on background pixels.

    .. math:: \mathrm{share}_i = \frac{\sum_{p:\,m_{ip}=0} \sum_c |a_{icp}|}{\sum_p \sum_c |a_{icp}|}

    for attributions :math:`a` of shape (n, channels, H, W) summed over channels, mask
    :math:`m` = 1 on the foreground. Attribution of a **class logit** (``target``: int or one per
    sample) by captum's ``IntegratedGradients``; of a **unit** by ``NeuronIntegratedGradients``
    (``layer`` = the module, ``neuron`` = the unit's index in that layer's output, e.g. ``(ch, y, x)``
    or ``ch``). ``n_steps`` Riemann steps, evaluated ``batch_size`` samples x steps at a time. A model
    that reads only foreground pixels gets share 0; a share near the background's pixel fraction means
    no preference. The model's train/eval state is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
    x : tensor or array of shape (n, channels, H, W)
    masks : array of shape (n, H, W) or (n, 1, H, W), 1 = foreground
    target : int or sequence of int, optional (class-logit mode)
    layer, neuron : module and unit index (unit mode)
    baseline : float or tensor, default=0
    n_steps : int, default=50
    batch_size : int, default=16
    return_maps : bool, default=False
        Also return the per-pixel maps :math:`\sum_c |a_{icp}|` (``maps``, shape (n, H, W)), e.g. for
        overlays in a report.
    """
    import torch

    try:
        from captum.attr import IntegratedGradients, NeuronIntegratedGradients
    except ImportError as e:  # pragma: no cover - captum is a dependency
        raise DataError("background_attribution_share needs captum; install it (pip install captum).") from e
    check_option("background_attribution_share", "method", method, ("integrated_gradients",))
    check_number("background_attribution_share", "n_steps", n_steps, low=1, integer=True)
    check_number("background_attribution_share", "batch_size", batch_size, low=1, integer=True)
    xt = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float()
    if xt.ndim != 4:
        raise DataError(f"x must have shape (n, channels, H, W); got {tuple(xt.shape)}.")
    M = np.asarray(masks)
    if M.ndim == 4 and M.shape[1] == 1:
        M = M[:, 0]
    if M.shape != (xt.shape[0], xt.shape[2], xt.shape[3]):
        raise DataError(f"masks must have shape (n, H, W) = {(xt.shape[0], xt.shape[2], xt.shape[3])}; got {M.shape}.")
    unit_mode = layer is not None or neuron is not None
    if unit_mode and (layer is None or neuron is None):
        raise DataError("Unit attribution needs both layer= (the module) and neuron= (the unit index).")
    if not unit_mode and target is None:
        raise DataError("Pass target= (class index per sample, or one for all) or layer= and neuron=.")
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        shares, maps = [], []
        for s in range(0, xt.shape[0], batch_size):
            xb = xt[s:s + batch_size].to(dev)
            if unit_mode:
                attr = NeuronIntegratedGradients(model, layer).attribute(
                    xb, neuron_selector=neuron, baselines=baseline, n_steps=n_steps,
                    internal_batch_size=batch_size * n_steps)
            else:
                tg = target if np.isscalar(target) else torch.as_tensor(np.asarray(target)[s:s + batch_size]).to(dev)
                attr = IntegratedGradients(model).attribute(
                    xb, target=tg, baselines=baseline, n_steps=n_steps,
                    internal_batch_size=batch_size * n_steps)
            a = attr.detach().abs().sum(dim=1).cpu().double().numpy()  # (b, H, W)
            if return_maps:
                maps.append(a.astype(np.float32))
            mb = M[s:s + batch_size] == 0
            tot = a.reshape(a.shape[0], -1).sum(axis=1)
            bg = (a * mb).reshape(a.shape[0], -1).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                shares.append(np.where(tot > 0, bg / tot, np.nan))
    finally:
        model.train(was_training)
    per = np.concatenate(shares)
    return AttributionShareResult(mean=float(np.nanmean(per)) if np.isfinite(per).any() else float("nan"),
                                  per_sample=per, method="neuron_integrated_gradients" if unit_mode else method,
                                  n_steps=int(n_steps), n_samples=int(per.size),
                                  maps=np.concatenate(maps) if return_maps else None)
