//! Errors of the engine, each with a category.
//!
//! Every error says what went wrong, where (file:line:column, stage, shard, record, object) and,
//! where there is one, what to do. The category tells the CLI which exit status to use and tells
//! a user whether to fix their input, their environment, or report a bug (Buck2's habit).

use std::fmt;
use std::path::PathBuf;

/// Who has to act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The pipeline file, a record, a data file or an argument is wrong: the user fixes it.
    Input,
    /// The machine is in the way: a busy store, a full disk, a missing program.
    Environment,
    /// A bug in ladle.
    Internal,
}

/// A place in a pipeline file, resolved to line and column (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// An error in a pipeline file, found before anything runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError {
    pub location: Location,
    pub stage: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if let Some(stage) = &self.stage {
            write!(f, "stage `{stage}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineError {}

/// An error raised by a stage implementation while it configures or runs.
///
/// Stage crates define their own error enums and convert into this one; the engine adds the
/// stage name, shard and record position when it reports it.
#[derive(Debug, Clone)]
pub struct StageError {
    pub category: Category,
    pub message: String,
    pub hint: Option<String>,
    /// Position of the offending record inside the shard being mapped, when known (0-based).
    pub record: Option<u64>,
}

impl StageError {
    pub fn input(message: impl Into<String>) -> Self {
        StageError { category: Category::Input, message: message.into(), hint: None, record: None }
    }
    pub fn environment(message: impl Into<String>) -> Self {
        StageError { category: Category::Environment, message: message.into(), hint: None, record: None }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        StageError { category: Category::Internal, message: message.into(), hint: None, record: None }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn at_record(mut self, position: u64) -> Self {
        self.record = Some(position);
        self
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StageError {}

impl From<Error> for StageError {
    fn from(e: Error) -> Self {
        StageError { category: e.category(), message: e.to_string(), hint: None, record: None }
    }
}

/// Any error the engine reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Pipeline(Box<PipelineError>),

    #[error("{path}: {message}")]
    PipelineFile { path: PathBuf, message: String },

    #[error("stage `{stage}` failed: {error}")]
    Stage { stage: String, error: StageError },

    #[error(
        "the store {store} is in use by another ladle process{}\n  hint: wait for it to finish, or pass --store DIR to use another store",
        .pid.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    StoreBusy { store: PathBuf, pid: Option<String> },

    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },

    #[error(
        "the store index at {path} could not be used: {source}\n  hint: run `ladle verify`; if the index itself is damaged, move the store away and rerun"
    )]
    Index { path: PathBuf, source: sled::Error },

    #[error(
        "object {digest} in the store is corrupt (its content no longer hashes to its name); it has been quarantined\n  hint: run the pipeline again: ladle recomputes what it needs"
    )]
    Corrupt { digest: String },

    #[error(
        "object {digest} is missing from the store\n  hint: run the pipeline again: ladle recomputes what it needs"
    )]
    MissingObject { digest: String },

    #[error("{0}")]
    Usage(String),

    #[error("internal error: {0} (this is a bug in ladle; please report it)")]
    Internal(String),
}

impl Error {
    pub fn category(&self) -> Category {
        match self {
            Error::Pipeline(_) | Error::PipelineFile { .. } | Error::Usage(_) => Category::Input,
            Error::Stage { error, .. } => error.category,
            Error::StoreBusy { .. }
            | Error::Io { .. }
            | Error::Index { .. }
            | Error::Corrupt { .. }
            | Error::MissingObject { .. } => Category::Environment,
            Error::Internal(_) => Category::Internal,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

impl From<PipelineError> for Error {
    fn from(e: PipelineError) -> Self {
        Error::Pipeline(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
