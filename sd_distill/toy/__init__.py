"""Models small enough for a CPU: tiny random pipelines for tests (``tiny``), the synthetic captioned
shape set (``synthetic``), its rule-based caption checker (``checker``) and the toy teacher's training
(``teacher``)."""
