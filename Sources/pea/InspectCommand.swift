import PEADiffusion

/// `pea inspect`'s options, declared once for its parser and its help.
enum InspectOptions {
    static let json = CommandOption.flag("--json", help: "print one JSON object (the same facts, machine-readable) instead of key: value lines")

    static let spec = CommandSpec(
        name: "inspect",
        usage: ["pea inspect PATH [--json]"],
        description: """
            Says what a model file or folder is, by the rules pea generate loads it with, without loading a model
            (one key: value line per fact; --json gives the same keys):
              single-file checkpoint  .safetensors or .ckpt in the LDM / A1111 layout: family (SD1.x, SD2.x, SDXL
                                      base, refiner, inpainting), whether Pea runs it, prediction type (the
                                      family's default: the tensors cannot tell), components inside, EMA weights
              LoRA                    format (kohya, PEFT/diffusers, LoCon), ranks, alphas and where they come
                                      from, modules, targets, and the family when names or widths tell it
              PEA adapter             form (SD1.x/SD2.x sequence only, or SDXL with fc and pooled), input width
                                      (the language encoder's hidden size), pea train's metadata
              VAE file                LDM or diffusers names
              diffusers folder        a pipeline (class, family, prediction type from the scheduler config,
                                      components, dtypes, variant files), one component (config.json's
                                      _class_name), a language encoder (Chinese-CLIP, XLM-R, BERT), or a folder
                                      with text_encoder/ and an adapter checkpoint
            Files also get their tensor count, parameters, dtypes and size. Any other safetensors or torch.save file
            is reported as unrecognised, with a few tensor names (exit status 0). A missing path, a truncated or
            corrupt file, or a folder with no model in it is an error naming the file (exit status 1).
            """,
        groups: [.init("Options", [json])],
        takesPositionals: true)
}

func runInspect(_ arguments: [String]) throws {
    typealias O = InspectOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    guard options.positionals.count == 1 else {
        throw PEAError.usage("inspect: give one PATH (a model file or folder), got \(options.positionals.count)\n\(O.spec.usage[0])")
    }
    let inspection = try ModelInspection.inspect(path: options.positionals[0])
    print(options.has(O.json) ? inspection.json.serialized() : inspection.text)
}
