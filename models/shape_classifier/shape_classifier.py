"""The shape classifier's model flow: which of three shapes a 16x16 image shows.

The layers come from shape_classifier_architecture.yaml: one submodel, a small CNN. `forward`
returns one raw score (logit) per class, not probabilities; cross_entropy_loss applies the
softmax, and evaluate.py takes the highest score as the prediction. The labels are the class
indices of dataset_functions.SHAPE_KINDS (0 circle, 1 square, 2 triangle).
"""
from engine.model_base import PyNet


class ShapeClassifier(PyNet):
    target_key = "labels"  # the data stream of class indices (int64) the logits are scored against
    paired_targets = True  # label i is the class of image i
    class_names = ("circle", "square", "triangle")  # evaluate.py labels its metrics and plots with these

    def forward(self, images):
        skips = {}  # one per pass (this architecture has no skip connections, but submodels take one)
        return self.model_components["classifier"]["shape_cnn"](images, skips)
