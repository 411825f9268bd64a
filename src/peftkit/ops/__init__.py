"""Maths several methods or tasks could use and that is not PEFT-specific, each tested against a reference: the fast
Walsh–Hadamard transform (:mod:`.hadamard`), weighted 1-D k-means codebooks (:mod:`.kmeans`), tensor-ring /
tensor-train contractions (:mod:`.tensor_ring`). ``ops`` imports nothing else of peftkit."""
