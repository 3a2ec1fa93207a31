#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// `pea inspect PATH`: what a model file or folder is, told by the rules the loaders themselves use — the single-file
// loader's `SingleFileCheckpoint.layout` and default configs, `LoRASet`'s reading of a LoRA, `PEAAdapter`'s reading
// of an adapter, `ModelFamily.detect` for a pipeline folder, `BertTextConfig` for a language encoder — so that what
// it says is what `pea generate` would do with the file. No model is built (the adapter's few tensors excepted).

/// The facts about one file or folder, in print order.
public struct ModelInspection {
    public let path: String
    /// What it is: "single-file checkpoint", "LoRA", "PEA adapter", "VAE", "diffusers pipeline", …
    public let kind: String
    /// (key, value, text): the JSON key and value, and how the text form shows the value (nil: from the value).
    public private(set) var facts: [(key: String, value: JSONValue, text: String?)] = []

    init(path: String, kind: String) {
        self.path = path
        self.kind = kind
    }

    mutating func add(_ key: String, _ value: JSONValue, text: String? = nil) { facts.append((key, value, text)) }

    /// Another inspection's facts under `prefix` (a folder holding an encoder and an adapter).
    mutating func add(_ prefix: String, _ other: ModelInspection) {
        add(prefix, .string(other.kind), text: "\(other.kind) (\(other.path))")
        for fact in other.facts { facts.append((prefix + "_" + fact.key, fact.value, fact.text)) }
    }

    public func value(_ key: String) -> JSONValue? { facts.first { $0.key == key }?.value }

    /// One object: `path`, `kind` and every fact.
    public var json: JSONValue {
        var object: [String: JSONValue] = ["path": .string(path), "kind": .string(kind)]
        for fact in facts { object[fact.key] = fact.value }
        return .object(object)
    }

    /// `key: value` lines, the values aligned.
    public var text: String {
        let rows = [("path", path), ("kind", kind)] + facts.map { ($0.key, $0.text ?? Self.describe($0.value)) }
        let width = rows.map(\.0.count).max()! + 2
        return rows.map { key, value in key + ":" + String(repeating: " ", count: width - key.count - 1) + value }
            .joined(separator: "\n")
    }

    static func describe(_ value: JSONValue) -> String {
        switch value {
        case .null: return "-"
        case .bool(let flag): return flag ? "yes" : "no"
        case .number(let number): return number == number.rounded() && abs(number) < 1e15 ? String(Int(number)) : String(number)
        case .string(let string): return string
        case .array(let values): return values.map(describe).joined(separator: ", ")
        case .object(let members): return members.keys.sorted().map { "\($0) \(describe(members[$0]!))" }.joined(separator: ", ")
        }
    }

    /// "1.23M", "45.6K", "789".
    static func count(_ n: Int) -> String {
        switch n {
        case 1_000_000_000...: return String(format1(Double(n) / 1e9)) + "B"
        case 1_000_000...: return format1(Double(n) / 1e6) + "M"
        case 1_000...: return format1(Double(n) / 1e3) + "K"
        default: return String(n)
        }
    }

    /// "1.3 MB", "860 B" (decimal units, as file browsers show them).
    static func bytes(_ n: Int) -> String {
        switch n {
        case 1_000_000_000...: return format1(Double(n) / 1e9) + " GB"
        case 1_000_000...: return format1(Double(n) / 1e6) + " MB"
        case 1_000...: return format1(Double(n) / 1e3) + " KB"
        default: return "\(n) B"
        }
    }

    private static func format1(_ x: Double) -> String {
        let tenths = Int((x * 10).rounded())
        return tenths % 10 == 0 ? String(tenths / 10) : "\(tenths / 10).\(tenths % 10)"
    }
}

// MARK: - Entry

extension ModelInspection {
    /// Inspects a file (safetensors or torch.save) or a folder. Throws `PEAError` naming the path for a missing path,
    /// an unreadable or corrupt file, or a folder that is no model folder.
    public static func inspect(path: String) throws -> ModelInspection {
        if isDirectory(path) { return try folder(path) }
        guard isRegularFile(path) else {
            throw PEAError.invalidFile(path: path, reason: existsAsFile(path) ? "not a regular file (a device, pipe or socket)" : "no such file or folder")
        }
        return try file(path)
    }

    static func file(_ path: String) throws -> ModelInspection {
        let file = try NamedTensorFile(path: path)
        let names = Set(file.names)
        if let layout = SingleFileCheckpoint.layout(names: names, shape: file.shape) {
            return try singleFile(file, layout: layout)
        }
        if !file.isTorch, !names.isEmpty, names.allSatisfy({ LoRASet.parse($0) != nil }) { return try lora(file) }
        if names.contains(where: { $0 == "layernorm.weight" || $0.hasSuffix(".layernorm.weight") }),
           names.contains(where: { $0.hasPrefix("projector.") || $0.contains(".projector.") }) {
            return try adapter(file)
        }
        if let vae = vaeLayout(file) {
            var result = ModelInspection(path: path, kind: "VAE")
            result.add("names", .string(vae), text: vae == "LDM" ? "LDM (as VAEs are released, or first_stage_model.*)" : "diffusers")
            result.addTensorFacts(file)
            return result
        }
        var result = ModelInspection(path: path, kind: file.isTorch ? "unrecognised torch.save file" : "unrecognised safetensors")
        result.addTensorFacts(file)
        result.add("example_tensors", .array(file.names.prefix(5).map { .string($0) }))
        return result
    }
}

// MARK: - Tensor facts

extension ModelInspection {
    /// What a file's tensors add up to under `names` (all of them by default).
    struct TensorSummary {
        var tensors = 0
        var parameters = 0
        var dtypes: [String: Int] = [:]

        init(_ file: NamedTensorFile, names: [String]? = nil) {
            for name in names ?? file.names {
                tensors += 1
                parameters += file.shape(name)?.reduce(1, *) ?? 0
                dtypes[file.dtype(name)?.rawValue ?? "?", default: 0] += 1
            }
        }

        var dtypeValue: JSONValue { .object(dtypes.mapValues { .number(Double($0)) }) }
        var dtypeText: String {
            dtypes.keys.sorted().map { dtypes.count == 1 ? $0 : "\($0) (\(dtypes[$0]!) tensors)" }.joined(separator: ", ")
        }
    }

    /// tensors, parameters, dtypes, file size and the metadata a file carries.
    mutating func addTensorFacts(_ file: NamedTensorFile, parameters: Int? = nil) {
        let summary = TensorSummary(file)
        add("tensors", .number(Double(summary.tensors)))
        let count = parameters ?? summary.parameters
        add("parameters", .number(Double(count)), text: count < 1000 ? "\(count)" : "\(count) (\(Self.count(count)))")
        add("dtypes", summary.dtypeValue, text: summary.dtypeText)
        if let size = try? openRegularFile(file.path) {
            close(size.descriptor)
            add("file_bytes", .number(Double(size.size)), text: Self.bytes(size.size))
        }
        addMetadata(file.metadata)
    }

    /// The file's safetensors metadata, short values only (kohya's tag frequencies run to megabytes).
    mutating func addMetadata(_ metadata: [String: String]) {
        let shown = metadata.filter { $0.value.count <= 100 }
        guard !shown.isEmpty else { return }
        add("metadata", .object(shown.mapValues { .string($0) }),
            text: shown.keys.sorted().map { "\($0)=\(shown[$0]!)" }.joined(separator: ", "))
    }

    /// "LDM" or "diffusers" when the file is a VAE alone as `AutoencoderKL.load(file:)` reads one.
    static func vaeLayout(_ file: NamedTensorFile) -> String? {
        let prefix = file.names.contains { $0.hasPrefix(SingleFileCheckpoint.vaePrefix) } ? SingleFileCheckpoint.vaePrefix : ""
        if file.names.contains(where: { $0.hasPrefix(prefix + "decoder.up_blocks.") }) { return "diffusers" }
        if file.names.contains(where: { $0.hasPrefix(prefix + "decoder.up.") }) { return "LDM" }
        return nil
    }
}

// MARK: - Single-file checkpoints

extension ModelInspection {
    static func familyName(_ family: ModelFamily) -> String {
        switch family {
        case .sd1: return "SD1.x"
        case .sd2: return "SD2.x"
        case .sdxl: return "SDXL"
        }
    }

    static func singleFile(_ file: NamedTensorFile, layout: SingleFileCheckpoint.Layout) throws -> ModelInspection {
        var result = ModelInspection(path: file.path, kind: "single-file checkpoint")
        let family = layout.family
        let variant = layout.refiner ? "refiner" : layout.inpainting ? "inpainting" : "base"
        result.add("family", .string(family.rawValue), text: familyName(family) + (variant == "base" ? "" : " " + variant))
        result.add("variant", .string(variant))
        // The loader's own refusal, word for word.
        do {
            _ = try SingleFileCheckpoint.inferFamily(path: file.path, names: Set(file.names), shape: file.shape)
            result.add("runs_in_pea", .bool(true))
        } catch let error as PEAError {
            result.add("runs_in_pea", .bool(false), text: "no: \(error.description)")
        }
        let prediction = try SingleFileCheckpoint.defaultConfig(family, "scheduler").string("prediction_type", default: "epsilon")
        result.add("prediction_type", .string(prediction),
                   text: "\(prediction) (the \(familyName(family)) default config's: the tensors cannot tell; "
                       + "pea generate --prediction-type overrides\(family == .sd2 ? "; SD2 512-base files predict epsilon" : ""))")
        result.add("prediction_type_source", .string("family default"))

        var components: [(String, String)] = [("unet", SingleFileCheckpoint.unetPrefix), ("vae", SingleFileCheckpoint.vaePrefix)]
        for (component, layout) in zip(family.textComponents, SingleFileCheckpoint.textLayouts(family)) {
            switch layout {
            case .clip(let prefix): components.append((component.encoder, prefix))
            case .openCLIP(let prefix, _): components.append((component.encoder, prefix))
            }
        }
        var present: [String: JSONValue] = [:], text: [String] = []
        for (name, prefix) in components {
            let names = file.names.filter { $0.hasPrefix(prefix) }
            guard !names.isEmpty else { continue }
            let summary = TensorSummary(file, names: names)
            present[name] = .number(Double(summary.parameters))
            text.append("\(name) (\(count(summary.parameters)))")
        }
        result.add("components", .object(present), text: text.isEmpty ? "none" : text.joined(separator: ", "))
        if let conv = file.shape(SingleFileCheckpoint.unetPrefix + "input_blocks.0.0.weight"), conv.count == 4 {
            result.add("unet_in_channels", .number(Double(conv[1])),
                       text: "\(conv[1])" + (conv[1] == 9 ? " (inpainting: latents, mask, masked image)" : ""))
        }
        let ema = file.names.filter { $0.hasPrefix("model_ema.") }.count
        result.add("ema", .bool(ema > 0), text: ema > 0 ? "yes (\(ema) model_ema.* tensors, not loaded)" : "no")
        result.addTensorFacts(file)
        return result
    }
}

// MARK: - LoRA

extension ModelInspection {
    static func lora(_ file: NamedTensorFile) throws -> ModelInspection {
        let set = try LoRASet([LoRASpec(path: file.path)])
        let modules = set.allModules
        var result = ModelInspection(path: file.path, kind: "LoRA")
        let kohya = modules.contains { $0.module.down.hasSuffix(".lora_down.weight") }
        let peft = modules.contains { $0.module.down.hasSuffix(".lora_A.weight") }
        let format = kohya && peft ? "mixed kohya and PEFT/diffusers" : kohya ? "kohya" : "PEFT/diffusers"
        func downShape(_ module: LoRASet.Module) -> [Int] { file.shape(module.down) ?? [] }
        let locon = modules.filter { let s = downShape($0.module); return s.count == 4 && (s[2] > 1 || s[3] > 1) }.count
        result.add("format", .string(format),
                   text: format + (locon > 0 ? ", with LoCon (\(locon) of \(modules.count) modules are k×k convolutions)" : ""))
        result.add("locon_modules", .number(Double(locon)))
        result.add("modules", .number(Double(modules.count)))
        var targets: [String: Int] = [:]
        for (component, _) in modules { targets[component, default: 0] += 1 }
        result.add("targets", .object(targets.mapValues { .number(Double($0)) }),
                   text: targets.keys.sorted().map { "\($0) (\(targets[$0]!))" }.joined(separator: ", "))
        let ranks = Set(modules.map(\.module.rank)).sorted()
        result.add("ranks", .array(ranks.map { .number(Double($0)) }))
        let alphas = Set(modules.map(\.module.alpha)).sorted()
        result.add("alphas", .array(alphas.map { .number(Double($0)) }))
        // Where LoRASet took the alphas from, in its order of precedence.
        let alphaSource = file.metadata["lora_adapter_metadata"] != nil ? "lora_adapter_metadata"
            : file.names.contains { $0.hasSuffix(".alpha") } ? "alpha tensors" : "rank"
        result.add("alpha_source", .string(alphaSource), text: ["lora_adapter_metadata": "the file's PEFT LoraConfig (lora_adapter_metadata)",
                                                               "alpha tensors": "the file's .alpha tensors",
                                                               "rank": "none in the file: alpha = rank"][alphaSource]!)
        let (family, reason) = loraFamily(modules, file: file)
        result.add("family", .string(family), text: "\(family) (\(reason))")
        result.addTensorFacts(file)
        return result
    }

    /// The family a LoRA is for, from what it names and the widths its factors read: a second text encoder is SDXL's;
    /// a cross-attention key/value's input is the text width (768 SD1.x, 1024 SD2.x, 2048 SDXL), as is a text
    /// encoder projection's (768 SD1.x, 1024 SD2.x). The merge itself checks every shape against the model.
    static func loraFamily(_ modules: [(component: String, module: LoRASet.Module)], file: NamedTensorFile) -> (String, String) {
        if modules.contains(where: { $0.component == "text_encoder_2" }) || file.names.contains(where: { $0.hasPrefix("lora_te1_") }) {
            return ("SDXL", "LoRAs for two text encoders")
        }
        for (component, module) in modules {
            guard let width = file.shape(module.down).flatMap({ $0.count >= 2 ? $0[1] : nil }) else { continue }
            let key = module.key
            if component == "unet", key.hasSuffix("attn2_to_k") || key.hasSuffix("attn2_to_v") {
                switch width {
                case 768: return ("SD1", "cross-attention width 768")
                case 1024: return ("SD2", "cross-attention width 1024")
                case 2048: return ("SDXL", "cross-attention width 2048")
                default: break
                }
            }
            if component == "text_encoder", key.hasSuffix("self_attn_q_proj") || key.hasSuffix("self_attn_k_proj") {
                switch width {
                case 768: return ("SD1", "text encoder width 768")
                case 1024: return ("SD2", "text encoder width 1024")
                default: break
                }
            }
        }
        let oneEncoder = modules.contains { $0.component == "text_encoder" }
        return (oneEncoder ? "SD1/SD2" : "unknown",
                oneEncoder ? "one text encoder; the widths read are not SD's" : "no module whose width tells the family")
    }
}

// MARK: - PEA adapters

extension ModelInspection {
    static func adapter(_ file: NamedTensorFile) throws -> ModelInspection {
        let source = try CheckpointWeights(path: file.path, backend: CPUBackend(threads: 1), dtype: .f32)
        let adapter = try PEAAdapter(weights: source, prefix: try PEAAdapter.adapterPrefix(source))
        var result = ModelInspection(path: file.path, kind: "PEA adapter")
        if let pooled = adapter.pooledDim {
            result.add("form", .string("SDXL"), text: "SDXL (sequence [L, \(adapter.outputDim)] through fc, pooled [\(pooled)])")
        } else {
            let family = [768: " (SD1.x's cross-attention width)", 1024: " (SD2.x's)"][adapter.outputDim] ?? ""
            result.add("form", .string("SD1/SD2"), text: "SD1.x/SD2.x sequence only ([L, \(adapter.outputDim)])\(family)")
        }
        result.add("input_width", .number(Double(adapter.inputDim)),
                   text: "\(adapter.inputDim) (the hidden size of the language encoder it reads)")
        result.add("output_width", .number(Double(adapter.outputDim)))
        if let pooled = adapter.pooledDim { result.add("pooled_width", .number(Double(pooled))) }
        result.add("widths", .array(adapter.widths.map { .number(Double($0)) }), text: adapter.widths.map(String.init).joined(separator: " → "))
        if file.metadata["pea"] == "pea train" {
            result.add("trained_by", .string("pea train"), text: "pea train" + (file.metadata["step"].map { ", step \($0)" } ?? ""))
        }
        result.addTensorFacts(file, parameters: adapter.parameterCount)
        return result
    }
}

// MARK: - Folders

extension ModelInspection {
    static func folder(_ path: String) throws -> ModelInspection {
        if isRegularFile(joinPath(path, "model_index.json")) { return try pipeline(path) }
        if isRegularFile(joinPath(path, "config.json")) { return try component(path) }
        let adapters = ["adapter.safetensors", "model.safetensors", "pytorch_model.bin", "adapter.bin", "proj.bin"]
        let adapterFile = adapters.map { joinPath(path, $0) }.first(where: isRegularFile)
        let encoder = joinPath(path, "text_encoder")
        let hasEncoder = isRegularFile(joinPath(encoder, "config.json"))
        guard adapterFile != nil || hasEncoder else {
            throw PEAError.invalidFile(path: path, reason: "not a model folder: no model_index.json (pipeline), config.json "
                                       + "(component), text_encoder/config.json or adapter checkpoint (\(adapters.joined(separator: ", ")))")
        }
        var result = ModelInspection(path: path, kind: hasEncoder && adapterFile != nil ? "language encoder and PEA adapter" : "model folder")
        var encoderWidth: Int?, adapterWidth: Int?
        if hasEncoder {
            let inspected = try component(encoder)
            encoderWidth = inspected.value("hidden_size")?.intValue
            result.add("encoder", inspected)
        }
        if let adapterFile {
            let inspected = try file(adapterFile)
            adapterWidth = inspected.value("input_width")?.intValue
            result.add("adapter", inspected)
        }
        if let encoderWidth, let adapterWidth {
            result.add("widths_match", .bool(encoderWidth == adapterWidth),
                       text: encoderWidth == adapterWidth ? "yes (\(encoderWidth))"
                           : "NO: the encoder's hidden size is \(encoderWidth), the adapter reads \(adapterWidth)")
        }
        return result
    }

    /// A diffusers pipeline root: its class, family (`ModelFamily.detect`, as `pea generate` decides it), prediction
    /// type (the scheduler config's, diffusers' default epsilon), components and their weights.
    static func pipeline(_ path: String) throws -> ModelInspection {
        let index = try ConfigFile(path: joinPath(path, "model_index.json"))
        var result = ModelInspection(path: path, kind: "diffusers pipeline")
        result.add("class", .string(try index.optionalString("_class_name") ?? "?"))
        let unetConfig = joinPath(path, "unet/config.json")
        if isRegularFile(unetConfig) {
            let unet = try UNetConfig(ConfigFile(path: unetConfig))
            do {
                let family = try ModelFamily.detect(folder: path, unet: unet)
                result.add("family", .string(family.rawValue), text: familyName(family))
                result.add("runs_in_pea", .bool(true))
            } catch let error as PEAError {
                result.add("family", .null, text: "-")
                result.add("runs_in_pea", .bool(false), text: "no: \(error.description)")
            }
            result.add("unet_in_channels", .number(Double(unet.inChannels)),
                       text: "\(unet.inChannels)" + (unet.inChannels == 9 ? " (inpainting)" : ""))
        }
        let scheduler = joinPath(path, "scheduler/scheduler_config.json")
        if isRegularFile(scheduler) {
            let config = try ConfigFile(path: scheduler)
            let prediction = try config.string("prediction_type", default: "epsilon")
            result.add("prediction_type", .string(prediction), text: "\(prediction) (scheduler/scheduler_config.json)")
            result.add("prediction_type_source", .string("scheduler config"))
            result.add("scheduler", .string(try config.optionalString("_class_name") ?? "?"))
        }
        // Components are the model_index entries naming a [library, class]; a null class is an absent optional one.
        var components: [String: JSONValue] = [:], lines: [String] = [], variants: Set<String> = []
        for (name, value) in index.values.sorted(by: { $0.key < $1.key }) {
            guard let pair = value.arrayValue, pair.count == 2, let className = pair[1].stringValue else { continue }
            let folder = joinPath(path, name)
            guard isDirectory(folder) else {
                components[name] = .object(["class": .string(className), "present": .bool(false)])
                lines.append("\(name) \(className) (MISSING)")
                continue
            }
            let weights = try weightFiles(folder)
            variants.formUnion(weights.compactMap(\.variant))
            var files: [String: JSONValue] = [:]
            for weight in weights {
                files[weight.name] = .object(["parameters": .number(Double(weight.summary.parameters)), "dtypes": weight.summary.dtypeValue])
            }
            components[name] = .object(["class": .string(className), "present": .bool(true), "weights": .object(files)])
            let main = weights.first { $0.variant == nil } ?? weights.first
            lines.append("\(name) \(className)" + (main.map { ", \(count($0.summary.parameters)) \($0.summary.dtypeText)" } ?? ""))
        }
        result.add("components", .object(components), text: lines.joined(separator: "; "))
        result.add("variants", .array(variants.sorted().map { .string($0) }), text: variants.isEmpty ? "none" : variants.sorted().joined(separator: ", "))
        return result
    }

    /// The weight files of a component folder (safetensors and torch.save, shards and variants each listed).
    static func weightFiles(_ folder: String) throws -> [(name: String, variant: String?, summary: TensorSummary)] {
        try listDirectory(folder).filter { $0.hasSuffix(".safetensors") || $0.hasSuffix(".bin") }.map { name in
            let parts = name.split(separator: ".")
            // diffusers' variant files: `<base>.<variant>.<extension>` (diffusion_pytorch_model.fp16.safetensors).
            let variant = parts.count >= 3 ? String(parts[parts.count - 2]) : nil
            return (name, variant, TensorSummary(try NamedTensorFile(path: joinPath(folder, name))))
        }
    }

    /// A folder with a `config.json`: a diffusers component (`_class_name`), a language encoder as
    /// `LanguageEncoders.load` recognises one (BERT / Chinese-CLIP / XLM-R by `model_type`), or a CLIP text encoder.
    static func component(_ path: String) throws -> ModelInspection {
        let config = try ConfigFile(path: joinPath(path, "config.json"))
        let modelType = try config.optionalString("model_type")
        var result: ModelInspection
        if let className = try config.optionalString("_class_name") {
            result = ModelInspection(path: path, kind: "diffusers component")
            result.add("class", .string(className))
            if className.hasPrefix("UNet") || className.hasPrefix("ControlNet") {
                let inChannels = try config.int("in_channels", default: 4)
                result.add("in_channels", .number(Double(inChannels)), text: "\(inChannels)" + (inChannels == 9 ? " (inpainting)" : ""))
                if let context = config.value("cross_attention_dim") { result.add("cross_attention_dim", context) }
            }
        } else if modelType == "chinese_clip" || config.contains("text_config") || modelType.map({
            BertTextConfig.bertModelTypes.contains($0) || BertTextConfig.robertaModelTypes.contains($0) }) ?? true {
            let encoder = try BertTextConfig(config)
            result = ModelInspection(path: path, kind: "language encoder")
            let name: String
            if case .paddingAware = encoder.positionIDs { name = "XLM-R" }
            else { name = encoder.modelType == "chinese_clip_text_model" || modelType == "chinese_clip" ? "Chinese-CLIP" : "BERT" }
            result.add("model", .string(name), text: "\(name) (model_type \(encoder.modelType))")
            result.add("hidden_size", .number(Double(encoder.hiddenSize)),
                       text: "\(encoder.hiddenSize) (a PEA adapter reading it has input width \(encoder.hiddenSize))")
            result.add("layers", .number(Double(encoder.layers)))
        } else if modelType == "clip_text_model" {
            result = ModelInspection(path: path, kind: "CLIP text encoder")
            result.add("hidden_size", .number(Double(try config.int("hidden_size"))))
            result.add("hidden_act", .string(try config.string("hidden_act", default: "quick_gelu")))
        } else {
            result = ModelInspection(path: path, kind: "model folder")
            result.add("model_type", .string(modelType ?? "?"))
        }
        let weights = try weightFiles(path)
        result.add("weights", .object(Dictionary(uniqueKeysWithValues: weights.map {
            ($0.name, JSONValue.object(["parameters": .number(Double($0.summary.parameters)), "dtypes": $0.summary.dtypeValue]))
        })), text: weights.isEmpty ? "none" : weights.map { "\($0.name) \(count($0.summary.parameters)) \($0.summary.dtypeText)" }.joined(separator: "; "))
        return result
    }
}
