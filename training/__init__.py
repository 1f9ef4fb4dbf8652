"""caft.training: fine-tuning with concept ablation (CAFT), plain fine-tuning, and the data formats.

Modules (import them directly; this package imports nothing heavy):

    caft.training.ablation    Ablation, make_ablation, ablated, compute_subspace_means, random_subspace
    caft.training.data        read_chat_jsonl, read_classification_jsonl, ChatExample, ClassificationExample
    caft.training.config      TrainConfig, presets `em` and `spurious`, build_train_config
    caft.training.trainer     train(cfg, out_dir, ...) -> TrainResult
    caft.training.classifier  EncoderClassifier, predict, predict_logits, accuracy
    caft.training.choice      choice_scores, choice_accuracy (causal LM, answer letters)
    caft.training.forward     the nnsight ablated forward used by the trainer
    caft.training.distributed data-parallel training (DDP through accelerate) and the hooked ablation
    caft.training.penalty     mode `penalty`: the soft one-sided loss term on the subspace's coordinates
    caft.training.sweep       the fewer-steps baseline: checkpoints of a run exported as models
"""
