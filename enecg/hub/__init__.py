"""Sharing on the Hugging Face Hub: model cards, licences, uploads (above the ensemble, which only saves itself).

* :func:`save_ensemble`: ``save_pretrained`` plus a card (from the config, or with evaluation results);
* :func:`push_ensemble`: save (when given a live model), card for the target repo, upload in one commit;
* :func:`update_card`: make a saved folder's card load a given repo;
* :func:`push_expert`: an in-house expert folder with its card (:func:`expert_card_context`), in one commit.
"""

from enecg.hub.publish import expert_card_context, push_ensemble, push_expert, save_ensemble, update_card

__all__ = ["expert_card_context", "push_ensemble", "push_expert", "save_ensemble", "update_card"]
