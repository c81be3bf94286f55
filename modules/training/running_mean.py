"""Reading values computed on the GPU without making the host wait for it.

SpeechBrain reads every training loss back to the host as soon as its step is queued (``loss.cpu()``),
which makes the host wait until the GPU has run the whole step: the GPU then idles while the host
prepares and queues the next one. A :class:`HostCopy` is made by the GPU when it gets there and read
later; :class:`DeviceRunningMean` sums the losses on their device and reads the sums one step late.
"""

import torch


class HostCopy:
    """A tensor's values in host memory, copied by its device when it gets there: reading them waits only
    for the work queued before the copy (none once the device has run it), not for the work queued since."""

    def __init__(self, tensor):
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            self.host = tensor.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensor.clone(), None

    def tolist(self):
        """The values, as Python numbers."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class DeviceRunningMean:
    """Mean of the finite values of a stream of scalar tensors on one device.

    :meth:`add` returns the mean of the values before the one added (the last one the device has
    copied back), without waiting for the device; :meth:`mean` waits and is exact. ``start_mean`` and
    ``start_count`` carry on a mean saved earlier (a run resumed mid-epoch).

    Example
    -------
    >>> running = DeviceRunningMean()
    >>> running.add(torch.tensor(1.0)), running.add(torch.tensor(float("nan"))), running.add(torch.tensor(3.0))
    (0.0, 1.0, 1.0)
    >>> running.mean()
    2.0
    """

    def __init__(self, start_mean=0.0, start_count=0):
        self.start = (start_mean * start_count, float(start_count))
        self.totals = None  # (sum, count) of the finite values, on the device
        self.in_flight = None  # a HostCopy of the totals
        self.latest = start_mean

    def add(self, value):
        """Adds a scalar tensor (NaN and inf are left out); returns the mean up to the previous one."""
        finite = torch.isfinite(value)
        totals = torch.stack([torch.where(finite, value.detach().float(), 0.0), finite.float()])
        if self.totals is None:
            self.totals = totals + torch.tensor(self.start, device=totals.device)
        else:
            self.totals = self.totals + totals
        if self.in_flight is not None:
            self.latest = self._mean(self.in_flight)
        self.in_flight = HostCopy(self.totals)
        return self.latest

    def mean(self):
        """The exact mean of all the values added (waits for the device)."""
        if self.totals is None:
            return self.latest
        return self._mean(HostCopy(self.totals))

    def _mean(self, copy):
        total, count = copy.tolist()
        return total / count if count else self.latest
