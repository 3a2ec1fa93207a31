// LoRA files merged into a model's weights as it loads (`pea generate --lora FILE[:SCALE]`), as diffusers'
// `load_lora_weights(file)` + `fuse_lora(lora_scale=SCALE)` do: W += SCALE · alpha/rank · up·down. Merging once at
// load leaves generation exactly as fast as without a LoRA.
//
// Two naming schemes are read (safetensors files):
//   diffusers / PEFT  `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), `text_encoder.…`,
//                     `text_encoder_2.…`; alpha = rank (diffusers' default when a file carries no alphas)
//   kohya             `lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha` (the UNet
//                     module in diffusers' naming or the LDM one, `input_blocks_1_1_…`, through `LDMNameTable`), and
//                     `lora_te_` (SD1/SD2 text encoder), `lora_te1_` / `lora_te2_` (SDXL's two)
// In both, `<module>.alpha` (a scalar) sets alpha. A file diffusers ≥ 0.34 saved may carry each component's PEFT
// LoraConfig in its header (`lora_adapter_metadata`); then, as in diffusers, that config's r / lora_alpha /
// rank_pattern / alpha_pattern / use_rslora set each module's scale (alpha/r, or alpha/√r with rsLoRA).
// Modules are named as the diffusers model names them; kohya's underscores are matched by comparing names with
// every `.` read as `_`, so no per-block rules are needed. A 3×3 convolution's LoRA (LoCon) has down
// [r, in, 3, 3] and up [out, r, 1, 1]; linear layers and 1×1 convolutions may store theirs 2-D or as [·, ·, 1, 1].
//
// Unlike diffusers, which warns about LoRA tensors that match no module and goes on, Pea refuses them: a LoRA that
// silently does nothing is worse than an error naming the tensor.

/// One `--lora FILE[:SCALE]`.
public struct LoRASpec: Equatable {
    public var path: String
    public var scale: Float

    public init(path: String, scale: Float = 1) {
        self.path = path
        self.scale = scale
    }

    /// `FILE` or `FILE:SCALE`. A suffix after the last `:` that is not a number is part of the path only when
    /// that path exists (so `C:\x.safetensors`-like names still work); otherwise it is a bad scale.
    public init(parsing text: String) throws {
        if let colon = text.lastIndex(of: ":") {
            let path = String(text[..<colon]), suffix = String(text[text.index(after: colon)...])
            if let scale = Float(suffix) {
                guard scale.isFinite, !path.isEmpty else {
                    throw PEAError.usage("--lora \(text): the scale must be a finite number after FILE:")
                }
                self.init(path: path, scale: scale)
                return
            }
            if !isRegularFile(text) {
                throw PEAError.usage("--lora \(text): '\(suffix)' is not a scale (FILE[:SCALE], SCALE a number such as 0.8)")
            }
        }
        guard !text.isEmpty else { throw PEAError.usage("--lora: empty FILE") }
        self.init(path: text, scale: 1)
    }
}

/// The LoRA files of one generation, read and checked up front, merged into each component's weights as they load
/// (`weights(_:component:)`).
public final class LoRASet {
    /// One LoRA module of one file: the tensors of its down and up factors and what multiplies their product.
    struct Module {
        let file: SafeTensorsCollection
        let name: String          // the module as the file names it (for messages)
        let key: String           // its `LoRASet.key`
        let down: String
        let up: String
        let rank: Int
        let alpha: Float
        let factor: Float         // scale · alpha / rank (/ √rank with rsLoRA)
    }

    /// Component ("unet", "text_encoder", "text_encoder_2") → module key (`LoRASet.key`) → the modules of every file.
    private var modules: [String: [String: [Module]]] = [:]
    private var used: Set<String> = []   // "component/key"

    public init(_ specs: [LoRASpec]) throws {
        for spec in specs { try read(spec) }
    }

    public var isEmpty: Bool { modules.isEmpty }

    /// The components some file has a LoRA for.
    public var components: Set<String> { Set(modules.keys) }

    /// Every module of every file with its component, in name order (`pea inspect`).
    var allModules: [(component: String, module: Module)] {
        modules.sorted { $0.key < $1.key }.flatMap { component, table in
            table.sorted { $0.key < $1.key }.flatMap { _, list in list.map { (component, $0) } }
        }
    }

    /// A module name compared across naming schemes: `.` read as `_`, and a text encoder's `text_model.` level
    /// dropped (transformers 5 saves CLIPTextModel without it; released LoRAs keep it).
    static func key(_ module: String, component: String) -> String {
        var name = String(module.map { $0 == "." ? "_" : $0 })
        if component != "unet", name.hasPrefix("text_model_") { name.removeFirst("text_model_".count) }
        return name
    }

    private static let kohyaPrefixes = [("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                                        ("lora_te_", "text_encoder")]
    private static let peftComponents = ["unet", "text_encoder", "text_encoder_2"]

    /// (component, module, role) of a tensor name; role is "down", "up" or "alpha".
    static func parse(_ name: String) -> (component: String, module: String, role: String)? {
        let roles = [(".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
                     (".lora_up.weight", "up"), (".alpha", "alpha")]
        guard let (suffix, role) = roles.first(where: { name.hasSuffix($0.0) }) else { return nil }
        let path = String(name.dropLast(suffix.count))
        if let (prefix, component) = kohyaPrefixes.first(where: { path.hasPrefix($0.0) }) {
            return (component, String(path.dropFirst(prefix.count)), role)
        }
        if let component = peftComponents.first(where: { path.hasPrefix($0 + ".") }) {
            return (component, String(path.dropFirst(component.count + 1)), role)
        }
        return nil
    }

    private func read(_ spec: LoRASpec) throws {
        let path = spec.path
        guard isRegularFile(path) else { throw PEAError.invalidFile(path: path, reason: "LoRA: no such file") }
        let file = try SafeTensorsCollection(path: path)
        let configs = try file.metadata["lora_adapter_metadata"].map { try PEFTLoRAConfig.read($0, path: path) } ?? [:]
        var parts: [String: (component: String, module: String, down: String?, up: String?, alpha: String?)] = [:]
        for name in file.names {
            guard let (component, module, role) = Self.parse(name) else {
                throw PEAError.invalidFile(path: path, reason: "LoRA tensor '\(name)' is not one Pea reads (diffusers/PEFT "
                                           + "unet.|text_encoder.<module>.lora_A|lora_B.weight, or kohya lora_unet_|lora_te_<module>"
                                           + ".lora_down|lora_up.weight|.alpha)")
            }
            let id = component + "/" + Self.key(module, component: component)
            var entry = parts[id] ?? (component, module, nil, nil, nil)
            switch role {
            case "down": entry.down = name
            case "up": entry.up = name
            default: entry.alpha = name
            }
            parts[id] = entry
        }
        guard !parts.isEmpty else { throw PEAError.invalidFile(path: path, reason: "LoRA: the file holds no tensors") }
        for (_, entry) in parts.sorted(by: { $0.key < $1.key }) {
            guard let down = entry.down, let up = entry.up else {
                let has = entry.down ?? entry.up ?? entry.alpha!
                throw PEAError.invalidFile(path: path, reason: "LoRA module '\(entry.module)' has '\(has)' but no "
                                           + (entry.down == nil ? "down (lora_A / lora_down)" : "up (lora_B / lora_up)") + " factor")
            }
            let downShape = try file.info(down).shape, upShape = try file.info(up).shape
            guard downShape.count == 2 || downShape.count == 4, upShape.count == 2 || upShape.count == 4,
                  upShape.count == 2 || (upShape[2] == 1 && upShape[3] == 1), downShape[0] == upShape[1], downShape[0] > 0 else {
                throw PEAError.invalidFile(path: path, reason: "LoRA tensors '\(down)' \(downShape) and '\(up)' \(upShape) are not "
                                           + "a down [r, in(, k, k)] and up [out, r(, 1, 1)] pair of the same rank")
            }
            for name in [down, up] where !(try file.info(name).dtype.isFloatingPoint) {
                throw PEAError.invalidFile(path: path, reason: "LoRA tensor '\(name)' is not floating-point")
            }
            let rank = Float(downShape[0])
            var alpha = rank
            var scaleRank = rank
            if let config = configs[entry.component] {
                // The file's PEFT config decides, as diffusers builds the adapter from it.
                guard entry.alpha == nil else {
                    throw PEAError.invalidFile(path: path, reason: "LoRA module '\(entry.module)' has an .alpha tensor and the file a "
                                               + "lora_adapter_metadata config; diffusers refuses such a file (network alphas and metadata)")
                }
                let (configRank, configAlpha) = config.rankAndAlpha(module: entry.module)
                guard configRank == downShape[0] else {
                    throw PEAError.invalidFile(path: path, reason: "LoRA module '\(entry.module)' has rank \(downShape[0]) but the file's "
                                               + "lora_adapter_metadata gives it rank \(configRank)")
                }
                alpha = configAlpha
                scaleRank = config.useRSLoRA ? rank.squareRoot() : rank
            } else if let alphaName = entry.alpha {
                let values = try file.tensor(alphaName).converted(to: .f32).floats()
                guard values.count == 1, values[0].isFinite else {
                    throw PEAError.invalidFile(path: path, reason: "LoRA tensor '\(alphaName)' must be one finite number, got \(values.count) values")
                }
                alpha = values[0]
            }
            modules[entry.component, default: [:]][Self.key(entry.module, component: entry.component), default: []]
                .append(Module(file: file, name: entry.module, key: Self.key(entry.module, component: entry.component),
                               down: down, up: up, rank: downShape[0], alpha: alpha, factor: spec.scale * alpha / scaleRank))
        }
    }

    /// `base` with this set's LoRAs for `component` merged into the weights they name (`base` itself when none).
    /// `unet`, the UNet's config, lets kohya keys in the LDM layout (`input_blocks_…`, `middle_block_…`,
    /// `output_blocks_…`) find their modules through the single-file loader's name table.
    public func weights(_ base: any WeightSource, component: String, unet: UNetConfig? = nil) -> any WeightSource {
        guard var table = modules[component] else { return base }
        if let unet {
            let ldm = LDMNameTable.unet(unet)
            for (key, list) in table where Self.ldmRoots.contains(where: { key.hasPrefix($0) }) {
                guard let renamed = ldm.renameUnderscored(key) else { continue }
                table[key] = nil
                table[renamed, default: []] += list
            }
        }
        return LoRAWeights(base: base, set: self, component: component, table: table)
    }

    /// The LDM UNet's top-level modules, which no diffusers module name starts with.
    private static let ldmRoots = ["input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_"]

    fileprivate func markUsed(_ component: String, _ key: String) { used.insert(component + "/" + key) }

    /// Throws, naming the file and a tensor, when a LoRA module of one of `components` matched no weight of the
    /// loaded model (the other components' modules are not looked at).
    public func requireAllUsed(components: [String]) throws {
        for component in components.sorted() {
            for (key, list) in (modules[component] ?? [:]).sorted(by: { $0.key < $1.key }) where !used.contains(component + "/" + key) {
                let module = list[0]
                throw PEAError.invalidFile(path: module.file.path, reason: "LoRA tensor '\(module.down)' matches no module of the "
                                           + "model's \(component) (is the LoRA for another model family?)")
            }
        }
    }
}

/// A weight source that adds LoRA deltas to the weights they name. The merge runs on the backend in f32 — the
/// weight is read at the model's dtype, widened, summed with every file's up·down (one GEMM each) and then stored as
/// the base would have stored it (`matrix` in the backend's half-weight dtype when it has one).
final class LoRAWeights: WeightSource {
    let base: any WeightSource
    let set: LoRASet
    let component: String
    let table: [String: [LoRASet.Module]]

    init(base: any WeightSource, set: LoRASet, component: String, table: [String: [LoRASet.Module]]) {
        self.base = base
        self.set = set
        self.component = component
        self.table = table
    }

    var backend: any ComputeBackend { base.backend }
    func contains(_ name: String) -> Bool { base.contains(name) }

    private func lookup(_ name: String) -> (key: String, modules: [LoRASet.Module])? {
        guard name.hasSuffix(".weight") else { return nil }
        let key = LoRASet.key(String(name.dropLast(".weight".count)), component: component)
        return table[key].map { (key, $0) }
    }

    func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        guard let (key, modules) = lookup(name) else { return try base.tensor(name, shape: shape) }
        let weight = try base.tensor(name, shape: shape)
        return try merged(weight, modules, key: key, as: weight.dtype)
    }

    func matrix(_ name: String, shape: [Int]) throws -> Tensor {
        guard let (key, modules) = lookup(name) else { return try base.matrix(name, shape: shape) }
        // Read unrounded (`tensor`), so that a half-weight backend rounds the merged weight once.
        let weight = try base.tensor(name, shape: shape)
        return try merged(weight, modules, key: key, as: matrixDType(weight.dtype))
    }

    private func merged(_ weight: Tensor, _ modules: [LoRASet.Module], key: String, as dtype: DType) throws -> Tensor {
        let shape = weight.shape
        guard shape.count == 2 || shape.count == 4 else {
            throw PEAError.invalidFile(path: modules[0].file.path, reason: "LoRA tensor '\(modules[0].down)' names '\(modules[0].name)', "
                                       + "a parameter of shape \(shape), not a linear or convolution weight")
        }
        let out = shape[0], inner = shape.dropFirst().reduce(1, *)
        var w = try weight.dtype == .f32 ? weight : backend.cast(weight, to: .f32)
        w = try w.reshaped([out, inner])
        for module in modules {
            let file = module.file
            let downShape = try file.info(module.down).shape, upShape = try file.info(module.up).shape
            let rank = downShape[0]
            // down must cover the weight's input side exactly: [r, in] for a linear or 1×1 weight ([r, in, 1, 1] too),
            // [r, in, k, k] for a k×k convolution.
            let downFits = Array(downShape.dropFirst()) == Array(shape.dropFirst())
                || (downShape.count == 2 && shape.count == 4 && shape[2] == 1 && shape[3] == 1 && downShape[1] == shape[1])
                || (downShape.count == 4 && shape.count == 2 && downShape[2] == 1 && downShape[3] == 1 && downShape[1] == shape[1])
            guard downFits, upShape[0] == out else {
                throw PEAError.invalidFile(path: file.path, reason: "LoRA tensors '\(module.down)' \(downShape) and '\(module.up)' "
                                           + "\(upShape) do not fit the model's '\(module.name)' weight of shape \(shape)")
            }
            func load(_ name: String, _ shape: [Int]) throws -> Tensor {
                var host = try file.tensor(name).converted(to: .f32)
                host.shape = shape
                return try backend.upload(host)
            }
            let down = try load(module.down, [rank, inner]), up = try load(module.up, [out, rank])
            w = try backend.gemm(up, down, transposeA: false, transposeB: false, alpha: module.factor, beta: 1, c: w)
        }
        for module in modules { set.markUsed(component, module.key) }
        w = try w.reshaped(shape)
        return try dtype == .f32 ? w : backend.cast(w, to: dtype)
    }
}

/// One component's PEFT LoraConfig as diffusers writes it into a LoRA file's `lora_adapter_metadata` (a JSON object
/// with keys `<component>.r`, `<component>.lora_alpha`, …), reduced to what sets a module's scale.
struct PEFTLoRAConfig {
    var rank: Int
    var alpha: Float
    /// PEFT's per-module overrides, keyed by a module name or a dotted suffix of one (in the file's key order,
    /// which is sorted: the first matching key wins, as in PEFT's get_pattern_key).
    var rankPattern: [(String, Int)]
    var alphaPattern: [(String, Float)]
    var useRSLoRA: Bool

    /// The configs by component ("unet", "text_encoder", "text_encoder_2") of a file's `lora_adapter_metadata`.
    static func read(_ text: String, path: String) throws -> [String: PEFTLoRAConfig] {
        func bad(_ reason: String) -> PEAError { .invalidFile(path: path, reason: "LoRA lora_adapter_metadata: " + reason) }
        let json: JSONValue
        do { json = try JSONValue.parse(text) } catch { throw bad("not JSON (\(error))") }
        guard let object = json.objectValue else { throw bad("not a JSON object") }
        var fields: [String: [String: JSONValue]] = [:]
        for (key, value) in object {
            guard let dot = key.firstIndex(of: ".") else { continue }
            fields[String(key[..<dot]), default: [:]][String(key[key.index(after: dot)...])] = value
        }
        return try fields.mapValues { config in
            func number(_ key: String) throws -> Double {
                guard let value = config[key]?.doubleValue, value.isFinite else { throw bad("'\(key)' must be a number") }
                return value
            }
            func pattern(_ key: String) throws -> [(String, Double)] {
                guard let value = config[key], !value.isNull else { return [] }
                guard let table = value.objectValue else { throw bad("'\(key)' must be an object") }
                return try table.keys.sorted().map { name in
                    guard let number = table[name]?.doubleValue else { throw bad("'\(key)' value for '\(name)' must be a number") }
                    guard name.allSatisfy({ $0.isLetter || $0.isNumber || "_.".contains($0) }) || name.first == "^"
                          && name.dropFirst().allSatisfy({ $0.isLetter || $0.isNumber || "_.".contains($0) }) else {
                        throw bad("'\(key)' key '\(name)' is a regular expression; Pea reads module names (and a leading ^) only")
                    }
                    return (name, number)
                }
            }
            for flag in ["use_dora", "lora_bias"] where config[flag]?.boolValue == true {
                throw bad("'\(flag)' is true; Pea merges plain LoRA only")
            }
            let rank = try number("r")
            guard rank >= 1, rank == rank.rounded() else { throw bad("'r' must be a positive integer") }
            return PEFTLoRAConfig(rank: Int(rank), alpha: Float(try number("lora_alpha")),
                                  rankPattern: try pattern("rank_pattern").map { ($0.0, Int($0.1)) },
                                  alphaPattern: try pattern("alpha_pattern").map { ($0.0, Float($0.1)) },
                                  useRSLoRA: config["use_rslora"]?.boolValue ?? false)
        }
    }

    /// PEFT's (r, alpha) for `module` (its name in the model, dotted).
    func rankAndAlpha(module: String) -> (Int, Float) {
        (Self.match(rankPattern, module) ?? rank, Self.match(alphaPattern, module) ?? alpha)
    }

    /// PEFT matches `re.match(rf"(.*\.)?({key})$", module)`: the key is the whole name or a dotted suffix of it
    /// (`^key`: the whole name only). In a key, `.` is the regex's any-character.
    private static func match<T>(_ table: [(String, T)], _ module: String) -> T? {
        let name = Array(module)
        for (key, value) in table {
            let anchored = key.first == "^"
            let pattern = Array(anchored ? key.dropFirst() : Substring(key))
            guard pattern.count <= name.count else { continue }
            let start = name.count - pattern.count
            guard start == 0 || (!anchored && name[start - 1] == ".") else { continue }
            if zip(pattern, name[start...]).allSatisfy({ $0 == "." || $0 == $1 }) { return value }
        }
        return nil
    }
}
