//! `encode`: image embeddings per record, from a CLIP vision tower or a Qwen2-VL one.
//!
//! ```toml
//! [stages.embeddings]
//! kind = "encode"
//! data = "captions"
//! model = "clip"              # a CLIP vision model, a CLIP model, a LLaVA-format VLM's tower,
//!                             # or a Qwen2-VL / Qwen2.5-VL model's tower
//! image = "{image}"           # a path (relative to the data file's folder) or embedded bytes
//! layer = -2                  # the hidden state: 0 = embeddings, i = layer i, -1 = the last layer
//! select = "patch"            # "patch" [patches, hidden] | "cls" [hidden] | "mean" [hidden]
//! tiling = { method = "catty", max_splits = 8 }   # optional: POINTS' CATTY views of each image
//! on_bad_image = "fail"       # or "drop": a record whose image cannot be used is dropped, counted
//! device = "auto"             # or "cpu", "cuda", "cuda:N"; dtype = "f32" | "bf16" | "f16"
//!                             # devices = ["cuda:0", "cuda:1"] or device = "cuda:all": a
//!                             # model replica per GPU; replicas = N: N on the CPU (crate::placement)
//! ```                         # (see ladle_models::device: default f32 on the CPU, bf16 on a GPU)
//!
//! The output is a *tensors* artifact, not records: one safetensors shard per input shard (see
//! [`crate::tensors`]), with `embedding` [rows, ...] and `record` (each row's record position).
//! Without tiling a row is a record; with it, a record has one row per tile and one for the
//! global thumbnail, told apart by `view`. `ladle export` writes them as `.safetensors` or `.npy`.
//!
//! With a Qwen2-VL or Qwen2.5-VL model the embeddings are the tower's merged image tokens (what
//! the language model reads in place of the image's pads, [`ladle_models::qwen2_vl::encoder`]),
//! their number set by the image's size within `min_pixels`/`max_pixels` (see [`crate::vlm`]):
//! `select = "patch"` writes one row [out_hidden] per merged token, with `position` (its row and
//! column in the image's grid of merged tokens); `"mean"` one row per record. `layer`, `"cls"`
//! and `tiling` are CLIP's and refused.
//!
//! Images are decoded and preprocessed as [`ladle_models::vision::preprocess`] says (bit-exact with
//! transformers' CLIPImageProcessor), then run through the tower `batch_images` at a time (default
//! 16 on the CPU, 64 on a GPU; it does not change results, so it is not part of the key). The tower runs only up to
//! `layer`. Image contents are part of each shard's key, as for `perplexity`. Embeddings are
//! written as f32 whatever the dtype the tower computes in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record};
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};
use ladle_engine::{ObjectWriter, StageContext};
use ladle_models::device::Placement;
use ladle_models::llm::ModelError;
use ladle_models::qwen2_vl::{ImagePatches, Qwen2Vl, Qwen2VlEncoder};
use ladle_models::vision::encoder::{ImageEncoder, Select};

use crate::image_source::{ImageField, bad_image};
use crate::model::{MODEL_PORT, model_dir};
use crate::model_error;
use crate::tensors::TensorShard;
use crate::vlm::PixelBounds;

pub struct EncodeKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data"), MODEL_PORT];

/// POINTS' CATTY: each image is cut into tiles of the tower's input size, plus a thumbnail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Catty {
    max_splits: u32,
}

impl StageKind for EncodeKind {
    fn name(&self) -> &'static str {
        "encode"
    }
    fn about(&self) -> &'static str {
        "image embeddings per record from a CLIP or Qwen2-VL vision tower (a tensors artifact)"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let image_src = params.required_string("image")?;
        let image = ImageField::parse(&image_src).map_err(|e| params.error("image", e))?;
        let layer_given = params.integer("layer")?;
        let layer = layer_given.unwrap_or(-2);
        params.record("layer", layer.into());
        let select = match params.choice("select", &["patch", "cls", "mean"])? {
            Some(s) => Select::from_name(&s).expect("checked by choice"),
            None => Select::Patch,
        };
        params.record("select", format!("{select:?}").to_lowercase().into());
        let tiling = match params.table("tiling")? {
            None => None,
            Some(t) => Some(parse_tiling(&t).map_err(|e| params.error("tiling", e))?),
        };
        if let Some(Catty { max_splits }) = tiling {
            params.record("tiling", serde_json::json!({ "method": "catty", "max_splits": max_splits }));
        }
        let drop_bad_images = params.choice("on_bad_image", &["fail", "drop"])?.as_deref() == Some("drop");
        params.record("on_bad_image", if drop_bad_images { "drop" } else { "fail" }.into());
        let batch_images = params.positive("batch_images")?;
        params.exclude_from_key("batch_images");
        let pixels = PixelBounds::configure(params)?;
        let replicas = crate::placement::configure_replicas(params)?;
        let placement = replicas.first();
        let batch_images = batch_images.map_or(placement.default_batch_images(), |n| n as usize);
        Ok(Arc::new(Encode {
            image,
            layer,
            layer_given: layer_given.is_some(),
            select,
            tiling,
            drop_bad_images,
            batch_images,
            pixels,
            placement,
            replicas,
        }))
    }
}

fn parse_tiling(t: &serde_json::Value) -> Result<Catty, String> {
    let obj = t.as_object().ok_or("`tiling` must be a table")?;
    if let Some(unknown) = obj.keys().find(|k| !["method", "max_splits"].contains(&k.as_str())) {
        return Err(format!("unknown key `{unknown}` in `tiling` (it takes `method` and `max_splits`)"));
    }
    match obj.get("method").and_then(|m| m.as_str()) {
        Some("catty") => {}
        Some(other) => return Err(format!("tiling method `{other}` is not known (\"catty\" is)")),
        None => return Err("`tiling` needs `method = \"catty\"`".into()),
    }
    let max_splits = match obj.get("max_splits") {
        None => 8,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=64) => n as u32,
            _ => return Err("`tiling.max_splits` must be an integer from 1 to 64".into()),
        },
    };
    Ok(Catty { max_splits })
}

struct Encode {
    image: ImageField,
    layer: i64,
    layer_given: bool,
    select: Select,
    tiling: Option<Catty>,
    drop_bad_images: bool,
    batch_images: usize,
    pixels: PixelBounds,
    placement: Placement,
    /// The model's copies (the first is `placement`).
    replicas: crate::placement::Replicas,
}

impl Stage for Encode {
    fn produces(&self) -> Produces {
        Produces::Tensors
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Map { port: "data", stage: self }
    }
    fn device_slot(&self) -> Option<String> {
        self.placement.slot()
    }
    fn replicas(&self) -> usize {
        self.replicas.len()
    }
    fn replica_slot(&self, replica: usize) -> Option<String> {
        self.replicas.slot(replica)
    }
}

impl MapStage for Encode {
    fn reads_record_files(&self) -> bool {
        true
    }

    fn record_files(&self, inputs: &Inputs, shard: &ShardInput<'_>) -> Result<Vec<PathBuf>, StageError> {
        self.image.files_of_shard(inputs.dataset_root("data").as_deref(), shard)
    }

    /// Loads the model onto replica `replica`'s device.
    fn prepare(
        &self,
        ctx: &StageContext<'_>,
        inputs: &Inputs,
        replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        let dir = model_dir(ctx, inputs)?;
        let device = self.replicas.get(replica).device().map_err(model_error)?;
        if Qwen2Vl::is_one(&dir) {
            return self.qwen2_vl_encoder(&dir, &device, inputs);
        }
        self.pixels.refuse_for(&dir)?;
        let encoder = ImageEncoder::load_on(&dir, &device, self.placement.dtype).map_err(model_error)?;
        if encoder.tower.state_index(self.layer).is_none() {
            let n = encoder.config.num_layers as i64;
            return Err(StageError::input(format!(
                "layer {} is out of range: {} has {} layers, so `layer` is from {} to {n}",
                self.layer,
                dir.display(),
                n,
                -(n + 1)
            )));
        }
        Ok(Arc::new(Encoder {
            encoder,
            image: self.image.clone(),
            root: inputs.dataset_root("data"),
            layer: self.layer,
            select: self.select,
            tiling: self.tiling,
            drop_bad_images: self.drop_bad_images,
            batch_images: self.batch_images,
        }))
    }
}

impl Encode {
    /// The mapper for a Qwen2-VL or Qwen2.5-VL tower, after refusing CLIP's parameters.
    fn qwen2_vl_encoder(
        &self,
        dir: &Path,
        device: &candle_core::Device,
        inputs: &Inputs,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        let refuse = |what: &str, hint: &str| {
            Err(StageError::input(format!("{}: {what} is for CLIP towers; this is a Qwen2-VL tower", dir.display()))
                .with_hint(hint.to_string()))
        };
        if self.layer_given {
            return refuse("`layer`", "drop `layer`: a Qwen2-VL tower gives its merged tokens, after its last block");
        }
        if self.select == Select::Cls {
            return refuse(
                "`select = \"cls\"`",
                "use `select = \"mean\"` or `\"patch\"`: the tower has no class token",
            );
        }
        if self.tiling.is_some() {
            return refuse(
                "`tiling`",
                "drop `tiling`: the tower reads each image at its own resolution (see `max_pixels`)",
            );
        }
        let mut encoder = Qwen2VlEncoder::load_on(dir, device, self.placement.dtype).map_err(model_error)?;
        self.pixels.apply(&mut encoder.processor, dir)?;
        Ok(Arc::new(MergedTokens {
            encoder,
            image: self.image.clone(),
            root: inputs.dataset_root("data"),
            mean: self.select == Select::Mean,
            drop_bad_images: self.drop_bad_images,
            batch_images: self.batch_images,
        }))
    }
}

struct Encoder {
    encoder: ImageEncoder,
    image: ImageField,
    root: Option<PathBuf>,
    layer: i64,
    select: Select,
    tiling: Option<Catty>,
    drop_bad_images: bool,
    batch_images: usize,
}

impl Encoder {
    /// The preprocessed views of a record's image: one, or CATTY's tiles and thumbnail.
    fn views(&self, record: &serde_json::Map<String, serde_json::Value>) -> Result<Vec<Vec<f32>>, String> {
        let image = self.image.locate(record, self.root.as_deref())?;
        let rgb = image.load().map_err(|e| e.to_string())?;
        let pre = &self.encoder.preprocess;
        match self.tiling {
            None => Ok(vec![pre.pixels(&rgb)?]),
            Some(Catty { max_splits }) => ladle_models::vision::catty::views(&rgb, pre.crop[0], max_splits)
                .iter()
                .map(|v| pre.pixels(v))
                .collect(),
        }
    }
}

impl ShardMapper for Encoder {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let mut pixels: Vec<Vec<f32>> = Vec::new();
        let mut out = TensorShard { row_shape: self.encoder.row_shape(self.select), ..Default::default() };
        let tiled = self.tiling.is_some();
        let mut views = Vec::new();
        let mut dropped = 0;
        for (i, line) in lines(shard.jsonl).enumerate() {
            let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(i as u64))?;
            match self.views(&record) {
                Ok(v) => {
                    for (k, px) in v.into_iter().enumerate() {
                        out.record.push((shard.first_record + i as u64) as i64);
                        views.push(k as i64);
                        pixels.push(px);
                    }
                }
                Err(_) if self.drop_bad_images => dropped += 1,
                Err(e) => return Err(bad_image(e).at_record(i as u64)),
            }
        }
        out.embedding.reserve(pixels.len() * out.row_shape.iter().product::<usize>());
        for batch in pixels.chunks(self.batch_images.max(1)) {
            let flat: Vec<f32> = batch.concat();
            let emb = self.encoder.encode(flat, batch.len(), self.layer, self.select).map_err(model_error)?;
            out.embedding.extend(
                emb.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(ModelError::from).map_err(model_error)?,
            );
        }
        if tiled {
            out.view = Some(views);
        }
        let rows = out.rows() as u64;
        output.append(&out.to_bytes()?)?;
        Ok(MappedShard { records: rows, dropped_on_error: dropped })
    }
}

/// `encode` with a Qwen2-VL or Qwen2.5-VL tower: each image's merged tokens.
struct MergedTokens {
    encoder: Qwen2VlEncoder,
    image: ImageField,
    root: Option<PathBuf>,
    /// One row per record (the tokens' mean), else one per token.
    mean: bool,
    drop_bad_images: bool,
    batch_images: usize,
}

impl MergedTokens {
    fn patches(&self, record: &serde_json::Map<String, serde_json::Value>) -> Result<ImagePatches, String> {
        let image = self.image.locate(record, self.root.as_deref())?;
        let rgb = image.load_as(ladle_models::qwen2_vl::processor::RGB_CONVENTION).map_err(|e| e.to_string())?;
        self.encoder.patches(&rgb).map_err(|e| e.to_string())
    }

    /// Adds one batch's images to `out`: its rows, record positions and token positions.
    fn encode_batch(&self, batch: &[(i64, ImagePatches)], out: &mut TensorShard) -> Result<(), ModelError> {
        let patches: Vec<&ImagePatches> = batch.iter().map(|(_, p)| p).collect();
        for ((record, _), image) in batch.iter().zip(self.encoder.encode(&patches)?) {
            if self.mean {
                out.embedding.extend(image.tokens.mean(0)?.to_vec1::<f32>()?);
                out.record.push(*record);
                continue;
            }
            out.embedding.extend(image.tokens.flatten_all()?.to_vec1::<f32>()?);
            let [frames, rows, cols] = image.grid;
            let positions = out.position.get_or_insert_with(Vec::new);
            for _ in 0..frames {
                for r in 0..rows {
                    for c in 0..cols {
                        out.record.push(*record);
                        positions.extend([r as i64, c as i64]);
                    }
                }
            }
        }
        Ok(())
    }
}

impl ShardMapper for MergedTokens {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let mut out = TensorShard { row_shape: vec![self.encoder.width()], ..Default::default() };
        if !self.mean {
            out.position = Some(Vec::new());
        }
        let mut batch = Vec::with_capacity(self.batch_images);
        let mut dropped = 0;
        for (i, line) in lines(shard.jsonl).enumerate() {
            let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(i as u64))?;
            match self.patches(&record) {
                Ok(p) => batch.push(((shard.first_record + i as u64) as i64, p)),
                Err(_) if self.drop_bad_images => dropped += 1,
                Err(e) => return Err(bad_image(e).at_record(i as u64)),
            }
            if batch.len() >= self.batch_images.max(1) {
                self.encode_batch(&batch, &mut out).map_err(model_error)?;
                batch.clear();
            }
        }
        self.encode_batch(&batch, &mut out).map_err(model_error)?;
        let rows = out.rows() as u64;
        output.append(&out.to_bytes()?)?;
        Ok(MappedShard { records: rows, dropped_on_error: dropped })
    }
}
