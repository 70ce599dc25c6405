//! The teacher of `[distill]`: a frozen model sharing the student's tokenizer, run forward on each
//! micro-batch (on the student's device or its own), whose final hidden states and output head
//! give the loss its distribution a chunk of rows at a time (`ops::distill`).

use candle_core::{Device, Tensor, D};

use crate::data::batch::Batch;
use crate::data::TrainData;
use crate::error::{KilnError, Result};
use crate::model::{self, LoadOptions};
use crate::ops::distill::{DistillSpec, TeacherRows};
use crate::recipe::{DistillSection, Quantize, Recipe};
use crate::step::StepPath;

pub struct Teacher {
    source: Source,
    student_device: Device,
    pub spec: DistillSpec,
}

enum Source {
    /// The teacher model, run on each micro-batch, and its output head on the student's device.
    Live {
        model: Box<model::Decoder>,
        head: Tensor,
    },
    /// Its top-k log-probabilities, written before by `kiln distill cache`.
    Cache(super::distill_cache::TopKCache),
}

impl DistillSection {
    pub fn spec(&self) -> DistillSpec {
        DistillSpec {
            alpha: self.alpha,
            temperature: self.temperature,
            loss: self.loss,
        }
    }
}

impl Teacher {
    /// The recipe's teacher (`None` without `[distill]`) for training `student` on `data`:
    /// `distill.cache` when set (checked against `data`), else the teacher model loaded frozen
    /// (on `distill.teacher_device`, else beside the student), whose tokenizer must equal the
    /// student's.
    pub fn load(
        recipe: &Recipe,
        student: &model::LoadedModel,
        data: &TrainData,
    ) -> Result<Option<Teacher>> {
        let Some(section) = &recipe.distill else {
            return Ok(None);
        };
        let source = match &section.cache {
            Some(dir) => Source::Cache(super::distill_cache::TopKCache::open(
                dir,
                data,
                student.model.config.vocab_size,
            )?),
            None => Self::live(recipe, section, student)?,
        };
        Ok(Some(Teacher {
            source,
            student_device: student.model.device.clone(),
            spec: section.spec(),
        }))
    }

    /// The teacher model itself, even where the recipe names a cache (`kiln distill cache`).
    pub fn load_model(recipe: &Recipe, student: &model::LoadedModel) -> Result<Teacher> {
        let section = recipe.distill.as_ref().ok_or_else(|| {
            KilnError::Recipe("the recipe has no [distill] section naming a teacher".into())
        })?;
        Ok(Teacher {
            source: Self::live(recipe, section, student)?,
            student_device: student.model.device.clone(),
            spec: section.spec(),
        })
    }

    fn live(
        recipe: &Recipe,
        section: &DistillSection,
        student: &model::LoadedModel,
    ) -> Result<Source> {
        let Some(path) = &section.teacher else {
            return Err(KilnError::Recipe(
                "distill.teacher is missing: name the teacher model directory".into(),
            ));
        };
        let student_device = student.model.device.clone();
        let device = match section.teacher_device.as_deref() {
            Some(spec) => crate::device::open(spec)?,
            None => student_device.clone(),
        };
        let dir = model::source::resolve_model_path(path)?;
        // The tokenizer first: a mismatch is refused before any teacher weight loads.
        let tokenizer = model::load_tokenizer(&dir)?;
        // The divergence compares the two distributions id by id.
        crate::tokenizer::check_same_ids(&student.tokenizer, &tokenizer).map_err(|why| {
            KilnError::Recipe(format!(
                "distill.teacher {}: its tokenizer differs from the student's ({}): {why}. Distillation compares the two models' probabilities token by token, so they must share a tokenizer (pick a teacher of the student's family)",
                dir.display(),
                student.dir.display()
            ))
        })?;
        let adapter = section
            .teacher_adapter
            .as_deref()
            .map(|a| crate::model::peft::read_adapter(std::path::Path::new(a)))
            .transpose()?;
        let opts = LoadOptions {
            layers: None,
            nf4_dequantized: false,
            device: device.clone(),
            dtype: student.model.dtype,
            quantize: section.teacher_quantize == Quantize::Nf4,
            // Frozen: its adapter computes without dropout.
            lora: adapter.as_ref().map(|a| crate::lora::LoraSettings {
                dropout: 0.0,
                ..a.settings.clone()
            }),
            seed: recipe.training.seed,
        };
        // Benchmarks on real architectures without downloads: a random student, a random teacher.
        let loaded = if recipe.model.random_weights {
            model::load_random(&dir, &opts)?
        } else {
            model::load(&dir, &opts)?
        };
        if let Some(a) = &adapter {
            crate::model::peft::apply_adapter(&loaded.model, a)?;
        }
        let teacher = loaded.model;
        let (student_vocab, teacher_vocab) =
            (student.model.config.vocab_size, teacher.config.vocab_size);
        let tokens = student.tokenizer.tokenizer.get_vocab_size(true);
        if student_vocab.min(teacher_vocab) < tokens {
            return Err(KilnError::Recipe(format!(
                "distill.teacher {}: its output covers {teacher_vocab} ids and the student's {student_vocab}, fewer than the tokenizer's {tokens}",
                dir.display()
            )));
        }
        let head = teacher
            .lm_head
            .as_ref()
            .unwrap_or(&teacher.embed_tokens)
            .to_device(&student_device)?;
        Ok(Source::Live {
            model: Box::new(teacher),
            head,
        })
    }

    /// The teacher's view of micro-batch `sequences`, on the student's device: its final hidden
    /// states `[N, H]` beside its output head, or its cached top-k log-probabilities.
    /// `student_batch` is the micro-batch the student runs, reused where the teacher shares its
    /// device.
    pub fn rows(
        &self,
        data: &TrainData,
        sequences: &[usize],
        pad_id: u32,
        student_batch: Option<&Batch>,
    ) -> Result<TeacherRows<'_>> {
        match &self.source {
            Source::Cache(cache) => cache.rows(data, sequences, pad_id, &self.student_device),
            Source::Live { model, head } => {
                let _p = crate::profile::scope("teacher", &model.device);
                let own;
                let batch = match student_batch {
                    Some(b) if b.inputs.device().same_device(&model.device) => b,
                    _ => {
                        own = data.batch(sequences, pad_id, &model.device)?;
                        &own
                    }
                };
                // The training step's layer code where it covers the model (fused kernels on
                // CUDA), else the reference forward.
                let rows = batch.inputs.dim(1)?;
                let hidden = if StepPath::Auto.explicit(model, rows) {
                    crate::step::forward_hidden(model, batch)?
                } else {
                    model.forward_hidden_with(&batch.inputs, batch.layout.as_ref(), None)?
                };
                let hidden = hidden
                    .detach()
                    .flatten_to(D::Minus2)?
                    .to_device(&self.student_device)?;
                Ok(TeacherRows::Hidden {
                    hidden,
                    head,
                    softcap: model.config.final_softcap,
                })
            }
        }
    }
}
