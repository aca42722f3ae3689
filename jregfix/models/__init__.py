"""Networks: SPIN's HMR regressor and the Mask R-CNN person segmenter."""
