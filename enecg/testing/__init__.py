"""Test tools (as ``accelerate.test_utils`` / ``transformers.testing_utils``): not used by the library itself.

* :mod:`enecg.testing.local_hub`: :class:`~enecg.testing.local_hub.LocalHub`, a loopback HTTP server speaking the
  Hugging Face Hub protocol (repos, commits, revisions, LFS-style uploads, failure injection), so the real
  ``huggingface_hub`` client pushes and pulls without a network;
* :mod:`enecg.testing.endpoint`: point ``huggingface_hub`` at such a server (or switch offline mode) at run time,
  and give it a fresh, empty Hub cache (every download then goes through the server).

The offline quickstart uses both; real users set ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` and talk to a real Hub.
"""
