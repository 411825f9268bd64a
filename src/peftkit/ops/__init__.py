"""Maths several methods or tasks use and that is not PEFT-specific, each tested against a reference: the fast
Walsh–Hadamard transform (:mod:`.hadamard`), weighted 1-D k-means codebooks (:mod:`.kmeans`), tensor-ring /
tensor-train contractions (:mod:`.tensor_ring`), spectral transforms (:mod:`.spectral`: FourierFT's frequency draw
and sparse inverse DFT, the orthonormal DCT and LoCA's sparse 2-D inverse DCT), task-vector merging
(:mod:`.merging`), sums of Kronecker products (:mod:`.kronecker`: Compacter's PHM layers). ``ops`` imports nothing
else of peftkit."""
