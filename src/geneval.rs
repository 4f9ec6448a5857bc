//! GenEval scoring (see issue 3): generic over a list of detections.
