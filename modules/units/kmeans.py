"""Mini-batch k-means in PyTorch, streamed over utterances so that SSL features of a large training set
never have to fit in memory: each frame's unit is its nearest centroid.
"""

import torch
import torch.nn as nn

from modules.training.checkpointing import atomic_write


class KMeans(nn.Module):
    """Mini-batch k-means (Sculley's update): each batch moves a centroid to the running mean of all the
    frames ever assigned to it. Initialised by k-means++ on the first batch."""

    def __init__(self, num_clusters, seed=0):
        super().__init__()
        self.num_clusters = num_clusters
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("centroids", torch.empty(0))
        self.register_buffer("counts", torch.empty(0))

    @torch.no_grad()
    def forward(self, frames):
        """Nearest centroid of each frame: (frames, dim) -> (frames,)."""
        distances = (self.centroids**2).sum(1) - 2 * frames @ self.centroids.T
        return distances.argmin(dim=1)

    @torch.no_grad()
    def partial_fit(self, frames):
        """One mini-batch update with frames (n, dim); n must be >= num_clusters for the first one."""
        if self.centroids.numel() == 0:
            self._init_plus_plus(frames)
        labels = self(frames)
        batch_counts = torch.bincount(labels, minlength=self.num_clusters).to(frames.dtype)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, frames)
        self.counts += batch_counts
        seen = self.counts > 0
        self.centroids[seen] += (sums[seen] - batch_counts[seen, None] * self.centroids[seen]) / self.counts[seen, None]

    def _init_plus_plus(self, frames):
        """k-means++: each new centroid drawn with probability proportional to the squared distance."""
        if len(frames) < self.num_clusters:
            raise ValueError(f"k-means needs at least {self.num_clusters} frames to start, got {len(frames)}")
        chosen = [torch.randint(len(frames), (1,), generator=self.generator).item()]
        distances = ((frames - frames[chosen[0]]) ** 2).sum(1)
        for _ in range(self.num_clusters - 1):
            chosen.append(torch.multinomial(distances.clamp(min=0) + 1e-12, 1, generator=self.generator).item())
            distances = torch.minimum(distances, ((frames - frames[chosen[-1]]) ** 2).sum(1))
        self.centroids = frames[chosen].clone()
        self.counts = torch.zeros(self.num_clusters, dtype=frames.dtype)

    def save(self, path):
        """Writes the fitted centroids and counts to ``path`` (atomically)."""
        with atomic_write(path, "wb") as f:
            torch.save(self.state_dict(), f)

    def load(self, path):
        """Loads centroids and counts written by :meth:`save` (the recipe's ``kmeans.pt``, an inference
        folder's ``kmeans.ckpt``), tensors only (``weights_only``). They are empty buffers until fitted,
        so this is not a plain state-dict load. Returns the k-means."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.centroids, self.counts = state["centroids"], state["counts"]
        return self
