"""Sharing on the Hugging Face Hub: model cards, licences, uploads (above the ensemble, which only saves itself).

* :func:`save_ensemble`: ``save_pretrained`` plus a card (from the config, or with evaluation results);
* :func:`push_ensemble`: save (when given a live model), card for the target repo, upload in one commit;
* :func:`update_card`: make a saved folder's card load a given repo.
"""

from enecg.hub.publish import push_ensemble, save_ensemble, update_card

__all__ = ["push_ensemble", "save_ensemble", "update_card"]
