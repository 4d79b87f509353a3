"""K-means hashing (numpy only).

Kaiming He, Fang Wen, Jian Sun: "K-means Hashing: an Affinity-Preserving
Quantization Method for Learning Binary Compact Codes", CVPR 2013.
Registered in `tbhvae.baselines.BASELINES` as "kmh".
"""
from __future__ import annotations

import numpy as np

from tbhvae.baselines.base import HashingBaseline, _principal_components, squared_distances

MAX_BITS_PER_SUBSPACE = 8  # 2^8 = 256 codewords per subspace
BFGS_MAX_ITERATIONS = 100
BFGS_GRADIENT_TOLERANCE = 1e-6  # relative to the gradient norm at the start
ARMIJO = 1e-4
FUNCTION_TOLERANCE = 1e-12  # relative decrease below which BFGS stops


def _index_bits(count: int) -> np.ndarray:
    """uint8 [2^count, count]: the binary digits of each index 0 .. 2^count - 1 (most significant first)."""
    indices = np.arange(2 ** count)
    return ((indices[:, None] >> np.arange(count - 1, -1, -1)[None, :]) & 1).astype(np.uint8)


def _hamming_scaled(bits: np.ndarray, scale: float) -> np.ndarray:
    """d_h(i, j) = s h(i, j)^(1/2) between the rows of a 0/1 table [k, b]: float [k, k]."""
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    return scale * np.sqrt(hamming)


def _subspace_capacities(subspace_bits: list[int], dim: int) -> list[int]:
    """Dimensions of each subspace, as even as the bits allow: proportional to its bits, at least its bits."""
    total = sum(subspace_bits)
    shares = np.array(subspace_bits, dtype=np.float64) * dim / total
    capacities = np.floor(shares).astype(int)
    for m in np.argsort(-(shares - capacities), kind="stable")[:dim - capacities.sum()]:
        capacities[m] += 1
    return capacities.tolist()


def _balanced_partition(variances: np.ndarray, capacities: list[int]) -> list[np.ndarray]:
    """Principal directions (sorted by decreasing variance) -> one index array per subspace.

    Greedy eigenvalue allocation (Ge, He, Ke & Sun, "Optimized Product
    Quantization", CVPR 2013, which the KMH code uses): each direction in turn
    goes to the subspace, among those not yet full, with the smallest sum of
    (shifted) log variances so far, so that the products of the subspaces'
    variances are balanced. Each subspace's directions stay in decreasing order.
    """
    logs = np.log(np.maximum(variances, 0.0) + 1e-20)
    logs = logs - logs.min() + 1.0
    sums = np.zeros(len(capacities))
    members: list[list[int]] = [[] for _ in capacities]
    for direction, value in enumerate(logs):
        open_sums = np.where([len(m) < c for m, c in zip(members, capacities)], sums, np.inf)
        target = int(np.argmin(open_sums))
        members[target].append(direction)
        sums[target] += value
    return [np.array(m, dtype=int) for m in members]


def _minimise_bfgs(objective, start: np.ndarray, inverse_hessian_scale: float) -> np.ndarray:
    """Quasi-Newton (BFGS) minimisation with Armijo backtracking; never returns a worse point than `start`.

    `objective(x) -> (value, gradient)`; the inverse-Hessian estimate starts
    at `inverse_hessian_scale` I.
    """
    x = start.copy()
    value, gradient = objective(x)
    stop = BFGS_GRADIENT_TOLERANCE * max(float(np.linalg.norm(gradient)), 1e-300)
    inverse_hessian = inverse_hessian_scale * np.eye(len(x))
    for _ in range(BFGS_MAX_ITERATIONS):
        if np.linalg.norm(gradient) <= stop:
            break
        direction = -inverse_hessian @ gradient
        slope = float(gradient @ direction)
        if slope >= 0.0:  # not a descent direction: restart from the scaled identity
            inverse_hessian = inverse_hessian_scale * np.eye(len(x))
            direction = -inverse_hessian @ gradient
            slope = float(gradient @ direction)
        step = 1.0
        while True:
            if -step * slope <= FUNCTION_TOLERANCE * abs(value):  # below what float64 can resolve
                return x
            candidate = x + step * direction
            new_value, new_gradient = objective(candidate)
            if new_value <= value + ARMIJO * step * slope:
                break
            step *= 0.5
        s, y = candidate - x, new_gradient - gradient
        sy = float(s @ y)
        if sy > 1e-300:
            rho = 1.0 / sy
            hy = inverse_hessian @ y
            inverse_hessian += ((1.0 + rho * float(y @ hy)) * rho * np.outer(s, s)
                                - rho * (np.outer(hy, s) + np.outer(s, hy)))
        stalled = value - new_value <= FUNCTION_TOLERANCE * abs(value)
        x, value, gradient = candidate, new_value, new_gradient
        if stalled:
            break
    return x


class _Subspace:
    """Affinity-preserving k-means in one subspace: codewords [k, d], index of each codeword, history."""

    def __init__(self, projected: np.ndarray, bits: int, affinity_weight: float):
        self.bits = bits
        self.affinity_weight = affinity_weight
        self.data = projected  # float64 [n, d], principal coordinates, decreasing variance
        self.table = _index_bits(bits)  # the b-bit code of each index
        # PCA-hashing initialisation (the paper's; the authors' init_PCAH): the 2^b codewords are the
        # vertices of a cube on the top b principal directions, scale = the least-squares fit of
        # sign(x) * scale to x there; codeword i gets index i, and the Hamming scale s is the
        # cube's edge, so that E_aff = 0 at the start.
        scale = float(np.mean(np.abs(projected[:, :bits])))
        self.hamming_scale = 2.0 * scale
        self.codewords = np.zeros((2 ** bits, projected.shape[1]))
        self.codewords[:, :bits] = scale * (2.0 * self.table - 1.0)
        self.index_of = np.arange(2 ** bits)  # codeword j carries index index_of[j]
        self.target = _hamming_scaled(self.table, self.hamming_scale)  # between indices
        self.square_sum = float(np.einsum("ij,ij->", projected, projected))
        self.history: list[tuple[str, float, float]] = []
        self.swaps = 0

    # --- objective pieces
    def _statistics(self, assignment: np.ndarray) -> None:
        k = len(self.codewords)
        self.counts = np.bincount(assignment, minlength=k).astype(np.float64)
        self.sums = np.stack([self.data[assignment == j].sum(axis=0) for j in range(k)])

    def _distances_between_codewords(self) -> np.ndarray:
        return np.sqrt(squared_distances(self.codewords, self.codewords))

    def _hamming_between_codewords(self, index_of: np.ndarray | None = None) -> np.ndarray:
        index_of = self.index_of if index_of is None else index_of
        return self.target[np.ix_(index_of, index_of)]

    def quantisation_error(self) -> float:
        """E_quan = mean ||x - c_i(x)||^2 from the current assignment's counts and sums."""
        c = self.codewords
        total = (self.square_sum - 2.0 * float(np.einsum("kd,kd->", self.sums, c))
                 + float(self.counts @ np.einsum("kd,kd->k", c, c)))
        return max(total, 0.0) / len(self.data)

    def affinity_error(self) -> float:
        """E_aff = sum_ij w_ij (d(c_i, c_j) - d_h(i, j))^2, w_ij = n_i n_j / n^2."""
        weights = np.outer(self.counts, self.counts) / len(self.data) ** 2
        return float(np.sum(weights * (self._distances_between_codewords() - self._hamming_between_codewords()) ** 2))

    def _record(self, step: str) -> None:
        self.history.append((step, self.quantisation_error(), self.affinity_error()))

    # --- the two steps
    def assign(self) -> np.ndarray:
        """Assignment step: every sample to its nearest codeword (as in k-means)."""
        # ||x - c||^2 up to ||x||^2, through einsum (see tbhvae.baselines.dgh on BLAS with busy cores)
        half_norms = 0.5 * np.einsum("kd,kd->k", self.codewords, self.codewords)
        assignment = np.argmax(np.einsum("nd,kd->nk", self.data, self.codewords) - half_norms, axis=1)
        self._statistics(assignment)
        self._record("assign")
        return assignment

    def update(self, index_search: bool) -> None:
        """Update step: each codeword in turn minimises E_quan + lambda E_aff with the rest fixed (BFGS)."""
        n = len(self.data)
        lam = self.affinity_weight
        for j in range(len(self.codewords)):
            n_j = self.counts[j]
            if n_j == 0:  # E does not depend on an empty cell's codeword
                continue
            others = np.arange(len(self.codewords)) != j
            centres = self.codewords[others]
            pair_weights = 2.0 * lam * n_j * self.counts[others] / n ** 2
            hamming = self._hamming_between_codewords()[j, others]
            sum_j = self.sums[j]

            def objective(c, centres=centres, pair_weights=pair_weights, hamming=hamming, sum_j=sum_j, n_j=n_j):
                # (1/n) sum_{i(x)=j} ||x - c||^2 up to a constant, + 2 lambda sum_i w_ij (||c - c_i|| - d_h)^2
                offsets = c[None, :] - centres
                lengths = np.maximum(np.sqrt(np.einsum("kd,kd->k", offsets, offsets)), 1e-12)
                errors = lengths - hamming
                value = (n_j * float(c @ c) - 2.0 * float(sum_j @ c)) / n + float(pair_weights @ errors ** 2)
                gradient = 2.0 * (n_j * c - sum_j) / n + 2.0 * (pair_weights * errors / lengths) @ offsets
                return value, gradient

            self.codewords[j] = _minimise_bfgs(objective, self.codewords[j], n / (2.0 * n_j))
        if index_search:
            self._search_indices()
        self._record("update")

    def _search_indices(self) -> None:
        """Swaps of two codewords' indices that lower E_aff (E_quan does not depend on the indices).

        Greedy: for each codeword a in turn, the swap with the codeword b that
        lowers E_aff most, if any; passes until none does.
        """
        weights = np.outer(self.counts, self.counts)
        distances = self._distances_between_codewords()
        k = len(self.codewords)
        improved = True
        while improved:
            improved = False
            for a in range(k):
                hamming = self._hamming_between_codewords()
                # Swapping the indices of a and b changes only rows/columns a and b: row a takes
                # b's Hamming distances and vice versa (the pair (a, b) itself keeps its distance).
                # Term [b, j] of each array below is the contribution of j to that change.
                keep_a = weights[a] * (distances[a] - hamming[a]) ** 2            # [j]
                move_a = weights[a] * (distances[a][None, :] - hamming) ** 2      # [b, j]
                keep_b = weights * (distances - hamming) ** 2                     # [b, j]
                move_b = weights * (distances - hamming[a][None, :]) ** 2         # [b, j]
                change = move_a + move_b - keep_a[None, :] - keep_b
                change[:, a] = 0.0
                np.fill_diagonal(change, 0.0)
                gain = change.sum(axis=1)
                gain[a] = 0.0
                b = int(np.argmin(gain))
                if gain[b] < -1e-9 * float(keep_b.sum()):
                    self.index_of[[a, b]] = self.index_of[[b, a]]
                    self.swaps += 1
                    improved = True

    def codeword_bits(self) -> np.ndarray:
        """uint8 [k, b]: the binary index of each codeword."""
        return self.table[self.index_of]


class KMH(HashingBaseline):
    """K-means hashing: product-space affinity-preserving k-means (He, Wen & Sun, CVPR 2013).

    The features are centred and rotated onto all their principal directions
    (PCA without reduction, as in the authors' code), which are split into
    M = ceil(bits / b) subspaces, b = `bits_per_subspace` bits each (the last
    one gets the remainder when b does not divide `bits`; the paper has
    M b = bits), by the balanced eigenvalue allocation of the authors' code
    (`_balanced_partition`). Each subspace has 2^b codewords c_i, each with a
    b-bit index i, and is fit by affinity-preserving k-means: minimise

        E = E_quan + lambda E_aff,
        E_quan = (1/n) sum_x ||x - c_i(x)||^2,
        E_aff = sum_{i,j} (n_i n_j / n^2) (||c_i - c_j|| - d_h(i, j))^2,

    where n_i is the number of samples in cell i and d_h(i, j) = s h(i, j)^(1/2)
    is the scaled square root of the Hamming distance between the indices, so
    that quantisation distance and Hamming distance agree. Initialisation
    (paper and code): PCA hashing, i.e. the codewords are the vertices of a
    cube on the subspace's top b principal directions at the least-squares
    scale, codeword i gets index i and s is the cube's edge (E_aff = 0 at the
    start). Then `iterations` rounds (50, the authors' default: "50 to 200,
    usually 50 is enough") of

    - assignment: each sample to its nearest codeword, as in k-means;
    - update: each codeword in turn minimises E with the others fixed
      (the paper's sequential quasi-Newton (BFGS) update; numpy BFGS with
      Armijo backtracking here), cost E_quan + 2 lambda sum_i w_ij (...)^2 as
      in the released code (the comment there notes the submitted version's
      typo);
    - codeword-to-index assignment (`index_search`, on by default): the
      indices are the cube's from the initialisation, and the paper and the
      authors' code keep them fixed, relying on the affinity term to move the
      codewords to fit them. Here, after each update, a greedy search over
      swaps of two codewords' indices accepts every swap that lowers E_aff;
      E_quan does not depend on the indices, so E still never increases in the
      update. It can only fire once the codewords have drifted from the
      cube; `index_swaps_` counts the swaps. `index_search=False` is the
      paper's exact procedure.

    lambda = `affinity_weight` = 10, b = 4 (the paper's and the code's
    defaults; the code recommends b = 2 for 32-bit SIFT, b = 4 otherwise).
    A code is the concatenation of the indices of the nearest codeword in
    each subspace; all training rows are used (the code: "better to use all
    samples"). Fully deterministic: `seed` is unused. Needs bits <= D.

    `history_` holds, per subspace, (step, E_quan, E_aff) after the first
    assignment and after every update and assignment; the update step never
    increases E = E_quan + lambda E_aff (its weights n_i fixed), the
    assignment step never increases E_quan (its codewords fixed).
    """

    def __init__(self, bits: int, seed: int = 0, bits_per_subspace: int = 4, iterations: int = 50,
                 affinity_weight: float = 10.0, index_search: bool = True):
        super().__init__(bits, seed)
        if (isinstance(bits_per_subspace, bool) or not isinstance(bits_per_subspace, (int, np.integer))
                or not 1 <= bits_per_subspace <= MAX_BITS_PER_SUBSPACE):
            raise ValueError(f"bits_per_subspace must be an integer in [1, {MAX_BITS_PER_SUBSPACE}], "
                             f"got {bits_per_subspace!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not np.isfinite(affinity_weight) or affinity_weight < 0:
            raise ValueError(f"affinity_weight (lambda) must be a finite number >= 0, got {affinity_weight}")
        self.bits_per_subspace = int(bits_per_subspace)
        self.iterations = int(iterations)
        self.affinity_weight = float(affinity_weight)
        self.index_search = bool(index_search)

    def _max_bits(self, num_train, dim):
        return dim

    def _subspace_bits(self) -> list[int]:
        b = self.bits_per_subspace
        return [b] * (self.bits // b) + ([self.bits % b] if self.bits % b else [])

    def _fit(self, train):
        self.mean_ = train.mean(axis=0)
        centred = train - self.mean_
        directions, variances = _principal_components(centred, train.shape[1])
        subspace_bits = self._subspace_bits()
        members = _balanced_partition(variances, _subspace_capacities(subspace_bits, train.shape[1]))
        self.projections_, self.codewords_, self.codeword_bits_, self.history_ = [], [], [], []
        self.index_swaps_ = 0
        for bits, columns in zip(subspace_bits, members):
            projection = directions[:, columns]
            subspace = _Subspace((centred @ projection).astype(np.float64), bits, self.affinity_weight)
            subspace.assign()
            for _ in range(self.iterations):
                subspace.update(self.index_search)
                subspace.assign()
            self.projections_.append(projection)
            self.codewords_.append(subspace.codewords.astype(np.float32))
            self.codeword_bits_.append(subspace.codeword_bits())
            self.history_.append(subspace.history)
            self.index_swaps_ += subspace.swaps

    def objective_history(self) -> np.ndarray:
        """float [steps, 2]: (E_quan, E_aff) summed over the subspaces at each recorded step."""
        return np.array([[row[1:] for row in history] for history in self.history_]).sum(axis=0)

    def _scores(self, rows):
        centred = rows - self.mean_
        parts = []
        for projection, codewords, table in zip(self.projections_, self.codewords_, self.codeword_bits_):
            nearest = np.argmin(squared_distances(centred @ projection, codewords), axis=1)
            parts.append(table[nearest])
        return np.concatenate(parts, axis=1).astype(np.float32) * 2.0 - 1.0
