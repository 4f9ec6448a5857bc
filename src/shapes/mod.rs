//! The shapes testbed world (issue 3): scenes, prompts, detector.
