"""Where simulated nodes are, and the round trips between them.

Nodes sit at 400 sites (cities) in metro regions weighted roughly like the public Petals swarm
(most in North America and Europe, some in Asia, a few elsewhere), scattered ~300 km around the
region's centre. A round
trip is twice the one-way delay: the great-circle distance at two thirds of light speed (fibre)
times a route inflation (cables do not follow great circles), plus each end's access delay (the
last mile and home router, 1-10 ms one way). Same city: ~5-25 ms; New York-London ~90 ms;
Frankfurt-Sydney ~330 ms.
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0
FIBRE_KM_PER_S = 200_000.0
ROUTE_INFLATION = 1.4
SCATTER_DEGREES = 3.0

# (name, latitude, longitude, weight)
REGIONS = [
    ("us-east", 39.0, -77.5, 16), ("us-west", 37.4, -122.0, 10), ("us-central", 41.9, -87.6, 6),
    ("canada", 43.7, -79.4, 3), ("brazil", -23.5, -46.6, 4), ("uk", 51.5, -0.1, 7),
    ("germany", 50.1, 8.7, 10), ("france", 48.9, 2.35, 5), ("nordics", 59.3, 18.1, 3),
    ("poland", 52.2, 21.0, 3), ("russia", 55.8, 37.6, 4), ("india", 19.1, 72.9, 5),
    ("singapore", 1.35, 103.8, 5), ("china", 31.2, 121.5, 5), ("japan", 35.7, 139.7, 5),
    ("korea", 37.6, 127.0, 3), ("australia", -33.9, 151.2, 3), ("south-africa", -26.2, 28.0, 2),
]


SITES = 400  # cities and data centres where nodes sit


class Geography:
    """Nodes (indexed from 0) at sites (cities scattered around the regions' centres), each with its
    own access delay. Propagation between sites is computed once: a whole swarm's delays are then
    a site-to-site table plus each end's access delay."""

    def __init__(self, rng: np.random.Generator, sites: int = SITES):
        self.rng = rng
        weights = np.array([r[3] for r in REGIONS], dtype=float)
        self.region_weights = weights / weights.sum()
        self.site_regions = rng.choice(len(REGIONS), size=sites, p=self.region_weights)
        lat = np.array([REGIONS[r][1] for r in self.site_regions]) + rng.normal(0, SCATTER_DEGREES, sites)
        lon = np.array([REGIONS[r][2] for r in self.site_regions]) + rng.normal(0, SCATTER_DEGREES, sites)
        lat, lon = np.radians(np.clip(lat, -89, 89)), np.radians(lon)
        self.site_units = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
        cos = np.clip(self.site_units @ self.site_units.T, -1.0, 1.0)
        # One-way propagation between sites, seconds.
        self.propagation = EARTH_RADIUS_KM * np.arccos(cos) * ROUTE_INFLATION / FIBRE_KM_PER_S
        self.sites = np.zeros(0, dtype=int)
        self.access_s = np.zeros(0)

    def add(self, count: int) -> np.ndarray:
        """Place ``count`` new nodes (each at a random site); returns their indices."""
        first = len(self.sites)
        self.sites = np.concatenate([self.sites, self.rng.integers(len(self.site_units), size=count)])
        self.access_s = np.concatenate([self.access_s, self.rng.uniform(0.001, 0.010, count)])
        return np.arange(first, first + count)

    def one_way(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """One-way delays in seconds, [len(a), len(b)], between nodes ``a`` and nodes ``b``."""
        return (self.propagation[np.ix_(self.sites[a], self.sites[b])]
                + self.access_s[a][:, None] + self.access_s[b][None, :])

    def rtt(self, a: int, b: np.ndarray) -> np.ndarray:
        """Round trips in seconds from node ``a`` to each of ``b``."""
        return 2.0 * self.one_way(np.array([a]), b)[0]

    def nearest(self, centre: int, count: int, among: np.ndarray) -> np.ndarray:
        """The ``count`` nodes of ``among`` closest to node ``centre`` (a regional outage)."""
        order = np.argsort(self.propagation[self.sites[centre], self.sites[among]], kind="stable")
        return among[order[:count]]
