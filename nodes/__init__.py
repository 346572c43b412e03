"""Node registration only. Node IDs are stable forever: saved workflows depend on them."""
from .apply import ApplyPerStageIDTokens
from .common import register_identity_folder
from .export import ExportIDEmbeddingAsTextualInversion
from .files import LoadIDEmbedding, SaveIDEmbedding
from .heatmap import IDAttentionHeatmap
from .learn import FaceAttentionLossTrainer, LearnIDEmbedding, LearnIDEmbeddingsBatch
from .options import IDEmbeddingOptions

register_identity_folder()

NODE_CLASS_MAPPINGS = {
    "LearnIDEmbedding": LearnIDEmbedding,
    "FaceAttentionLossTrainer": FaceAttentionLossTrainer,
    "LearnIDEmbeddingsBatch": LearnIDEmbeddingsBatch,
    "ApplyPerStageIDTokens": ApplyPerStageIDTokens,
    "SaveIDEmbedding": SaveIDEmbedding,
    "LoadIDEmbedding": LoadIDEmbedding,
    "IDAttentionHeatmap": IDAttentionHeatmap,
    "IDEmbeddingOptions": IDEmbeddingOptions,
    "ExportIDEmbeddingAsTextualInversion": ExportIDEmbeddingAsTextualInversion,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LearnIDEmbedding": "Learn ID Embedding (SeFi-IDE)",
    "FaceAttentionLossTrainer": "Learn ID Embedding, advanced: Face Attention Loss Trainer (SeFi-IDE)",
    "LearnIDEmbeddingsBatch": "Learn ID Embeddings, batch (SeFi-IDE)",
    "ApplyPerStageIDTokens": "Apply Per-Stage ID Tokens (SeFi-IDE)",
    "SaveIDEmbedding": "Save ID Embedding (SeFi-IDE)",
    "LoadIDEmbedding": "Load ID Embedding (SeFi-IDE)",
    "IDAttentionHeatmap": "ID Attention Heatmap (SeFi-IDE)",
    "IDEmbeddingOptions": "ID Embedding Options: strength, region (SeFi-IDE)",
    "ExportIDEmbeddingAsTextualInversion": "Export ID Embedding as Textual Inversion (SeFi-IDE)",
}
