//! What an embedding row and its objective record about how they were made. They live
//! here, below the store that writes them, because objectives make them.

use serde::{Deserialize, Serialize};

/// One embedded example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Display name (the training audio's file name, or the experiment case).
    pub name: String,
    pub prompt: String,
    /// Seconds.
    pub duration: f64,
    pub seed: u64,
    /// Where the example came from (relative path of a training file), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Seconds into the audio file where the scored excerpt starts (audio examples only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
}

/// The objective whose gradient was embedded, with every setting it depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveInfo {
    pub name: String,
    pub settings: serde_json::Value,
}
