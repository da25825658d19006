"""The text-like encoder: MF + hashing layer + straight-through sign (BinMF), the MF baseline, scoring, export."""
from binllm.encoder.export import export_codes, load_encoder, read_code_tables, save_encoder, write_code_tables
from binllm.encoder.model import BinaryEncoder, HashingLayer, MatrixFactorization, sign_ste
from binllm.encoder.score import rows_auc, score_pairs
from binllm.encoder.train import EncoderResult, anneal_beta, train_encoder

__all__ = [
    "BinaryEncoder", "EncoderResult", "HashingLayer", "MatrixFactorization", "anneal_beta", "export_codes",
    "load_encoder", "read_code_tables", "rows_auc", "save_encoder", "score_pairs", "sign_ste", "train_encoder",
    "write_code_tables",
]
